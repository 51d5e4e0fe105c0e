"""QGNet (FSS stage): the prior region map, the 514-wide decoder, the prior extractor's weights
(MoCo encoder_k / encoder_q, the pre-training export, a plain ResNet file, missing files), BN modes,
the authors' checkpoint names, the CLI. CPU, tiny inputs and a ResNet-18 prior extractor."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from hydra.utils import instantiate

from fewshotseg.backbones import Backbone
from fewshotseg.cli import _user_error
from fewshotseg.errors import ConfigError
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.qgnet import (
    QGNet,
    convert_official_state,
    load_prior_extractor_state,
    to_official_state,
)
from fewshotseg.ops.prior import max_cosine_map
from fewshotseg.train import train
from helpers import SHORT, SIZE, build_on_meta, compose_config, compose_train_cfg, episode, tiny_backbone


def tiny_qgnet(prior_extractor=None, bn_mode="eval", **kwargs):
    opts = {"init": "random", "name": "resnet18", **(prior_extractor or {})}
    return QGNet(
        tiny_backbone(bn_mode), prior_extractor=opts, bins=[1.0, 0.5, 0.25, 0.125], reduce_dim=32, **kwargs
    )


def resnet18_state(seed: int, with_fc: bool = True) -> dict[str, torch.Tensor]:
    """A torchvision-named ResNet-18 state dict (timm's names are the same), random weights."""
    torch.manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    return state if with_fc else {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_trainable_parameters_match_official():
    with torch.device("meta"):
        model = QGNet(functools.partial(Backbone, name="resnet50_psp", frozen=True),
                      prior_extractor={"init": "random"}, bins=[60, 30, 15, 8])  # fmt: skip
    # PFENet's heads with a 514-wide init_merge, plus down_learn_super / down_learn_unsuper
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 20_255_242
    assert [m[0].in_channels for m in model.fem.init_merge] == [514] * 4
    assert model.prior_extractor.name == "resnet50_dilated" and model.prior_extractor.frozen
    assert model.down_learn_unsuper[0].in_channels == 2048 and model.down_learn_unsuper[0].kernel_size == (
        3,
        3,
    )


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("init", ["random", "supervised_copy"])
def test_training_step_shapes_and_gradients(K, init):
    torch.manual_seed(0)
    model = tiny_qgnet({"init": init}).train()
    batch = episode(K=K)
    logits, aux = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and set(aux) == {"aux"}
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    loss.backward()
    assert torch.isfinite(loss)
    for head in (model.down_learn_super, model.down_learn_unsuper, model.down_query, model.down_supp):
        assert head[0].weight.grad.abs().sum() > 0  # learned end to end (official optimiser groups)
    assert all(p.grad is None for p in model.backbone.parameters())
    if model.prior_extractor is not None:
        assert all(not p.requires_grad for p in model.prior_extractor.parameters())
    with torch.no_grad():
        del batch["query_mask"]
        assert model.eval()(batch)[0].shape == (2, 2, SIZE, SIZE)


def test_region_map_is_the_self_correspondence_of_the_two_projections(monkeypatch):
    torch.manual_seed(0)
    model = tiny_qgnet().eval()
    batch = episode(K=1)
    seen = {}
    real = model.fem.forward
    monkeypatch.setattr(
        model.fem, "forward", lambda feat, vectors, maps: seen.update(maps=maps) or real(feat, vectors, maps)
    )
    with torch.no_grad():
        model(batch)
        feats = model.backbone(batch["query_img"])
        a = model.down_learn_super(feats[4])
        u = model.down_learn_unsuper(model.prior_extractor(batch["query_img"])[4])
    assert seen["maps"].shape == (2, 2, 9, 9)  # [guided map, prior region map]
    torch.testing.assert_close(seen["maps"][:, 1:], max_cosine_map(a, u))
    assert seen["maps"].min() >= 0 and seen["maps"].max() <= 1


def test_identical_projections_of_the_same_features_give_ones_before_min_max():
    """supervised_copy + equal projection weights: A == U, so every position's max cosine is 1
    (itself); min-max of such a (near-)constant map stays finite (the eps guard)."""
    model = tiny_qgnet({"init": "supervised_copy"}).eval()
    model.down_learn_unsuper.load_state_dict(model.down_learn_super.state_dict())
    feats = model.backbone(episode()["query_img"])
    a = model.down_learn_super(feats[4])
    u = model.down_learn_unsuper(model.prior_features(None, feats))
    assert torch.equal(a, u)
    raw = max_cosine_map(a, u, minmax=False)
    alive = a.flatten(2).norm(dim=1).view_as(raw) > 1e-2  # an all-zero vector (ReLU) has cosine 0
    assert alive.float().mean() > 0.5
    torch.testing.assert_close(raw[alive], torch.ones_like(raw[alive]), atol=1e-4, rtol=0)
    (region,) = model.extra_query_maps(feats, None, (9, 9))
    assert torch.isfinite(region).all() and region.min() >= 0 and region.max() <= 1


def test_empty_support_masks_give_no_nan():
    torch.manual_seed(0)
    model = tiny_qgnet().train()
    batch = episode(K=2)
    batch["support_masks"][:] = 0
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)


def test_prior_extractor_bn_eval_by_default_and_official_drift_as_option():
    batch = episode()
    model = tiny_qgnet().train()
    model(batch)
    assert model.prior_extractor.body.state_dict()["bn1.num_batches_tracked"] == 0
    drifting = tiny_qgnet({"bn_mode": "train"}).train()
    drifting(batch)
    assert drifting.prior_extractor.body.state_dict()["bn1.num_batches_tracked"] == 1


# ------------------------------------------------------------------------------------------------
# Prior-extractor weights
# ------------------------------------------------------------------------------------------------


def fake_moco(path, q_seed=1, k_seed=2):
    """A MoCo-v2 checkpoint: DataParallel-prefixed query and key encoders with MLP heads, a queue."""
    state = {}
    for enc, seed in (("encoder_q", q_seed), ("encoder_k", k_seed)):
        for k, v in resnet18_state(seed).items():
            if not k.startswith("fc."):
                state[f"module.{enc}.{k}"] = v
        state[f"module.{enc}.fc.0.weight"] = torch.randn(512, 512)  # MoCo-v2's MLP head
        state[f"module.{enc}.fc.2.weight"] = torch.randn(128, 512)
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 2000, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}, path)


@pytest.mark.parametrize("encoder,seed", [("encoder_k", 2), ("encoder_q", 1)])
def test_loads_a_moco_checkpoint(tmp_path, encoder, seed):
    fake_moco(tmp_path / "checkpoint_2000.pth.tar")
    opts = {"init": "weights", "weights": str(tmp_path / "checkpoint_2000.pth.tar"), "encoder": encoder}
    model = tiny_qgnet(opts)
    expected = resnet18_state(seed, with_fc=False)
    loaded = model.prior_extractor.body.state_dict()
    assert set(loaded) == set(expected)  # heads, queue dropped
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_loads_the_pretrain_export_and_a_plain_resnet_file(tmp_path):
    export = resnet18_state(3, with_fc=False)
    torch.save({"state_dict": export, "arch": "resnet18"}, tmp_path / "prior_extractor.pth")
    model = tiny_qgnet({"init": "weights", "weights": str(tmp_path / "prior_extractor.pth")})
    assert torch.equal(
        model.prior_extractor.body.state_dict()["layer4.1.conv2.weight"], export["layer4.1.conv2.weight"]
    )
    torch.save(resnet18_state(4), tmp_path / "resnet18.pth")  # torchvision file with fc
    model = tiny_qgnet({"init": "weights", "weights": str(tmp_path / "resnet18.pth")})
    assert torch.equal(
        model.prior_extractor.body.state_dict()["conv1.weight"], resnet18_state(4)["conv1.weight"]
    )


def test_weight_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="python -m fewshotseg.pretrain"):
        tiny_qgnet({"init": "weights", "weights": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="python -m fewshotseg.pretrain"):
        tiny_qgnet({"init": "weights"})  # no file given
    torch.save({"state_dict": resnet18_state(0, with_fc=False), "arch": "resnet18"}, tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="arch='resnet18'"):
        tiny_qgnet({"init": "weights", "weights": str(tmp_path / "r18.pth"), "name": "resnet34"})
    with pytest.raises(ConfigError, match="unknown option"):
        tiny_qgnet({"ckpt": "x"})
    with pytest.raises(ConfigError, match="init="):
        tiny_qgnet({"init": "imagenet"})
    state, arch = load_prior_extractor_state(tmp_path / "r18.pth")
    assert arch == "resnet18" and not any(k.startswith("fc.") for k in state)


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def paper_model():
    with torch.device("meta"):
        return QGNet(functools.partial(Backbone, name="resnet50_psp", frozen=True),
                     prior_extractor={"init": "random"}, bins=[60, 30, 15, 8])  # fmt: skip


def test_official_names_round_trip_and_match_the_authors_layout():
    model = paper_model()
    ours = model.state_dict()
    official = to_official_state(ours)
    assert {"layer0.7.weight", "layer0_unsuper.0.weight", "layer0_unsuper.1.running_mean",
            "layer4_unsuper.2.conv3.weight", "down_learn_super.0.weight", "down_learn_unsuper.0.weight",
            "init_merge.0.0.weight"} <= set(official)  # fmt: skip
    assert official["init_merge.0.0.weight"].shape[1] == 514
    assert len(official) == 685  # the official QGNet state dict has 685 tensors
    back = convert_official_state({"module." + k: v for k, v in official.items()})
    assert list(back) == list(ours)
    model.load_state_dict(back, strict=True, assign=True)


def test_convert_names_missing_and_unmapped_keys():
    official = to_official_state(paper_model().state_dict())
    with pytest.raises(ConfigError, match="down_learn_unsuper.0.weight"):
        convert_official_state({k: v for k, v in official.items() if not k.startswith("down_learn_unsuper")})
    with pytest.raises(ConfigError, match="layer0_unsuper.0.weight"):
        convert_official_state({k: v for k, v in official.items() if not k.startswith("layer0_unsuper")})
    with pytest.raises(ConfigError, match="layer5"):
        convert_official_state({**official, "layer5.0.weight": official["down_query.0.weight"]})


# ------------------------------------------------------------------------------------------------
# Configs and the command line
# ------------------------------------------------------------------------------------------------


def test_method_qgnet_on_synthetic_runs_without_a_weight_file(tmp_path, data_dir):
    """conf/preset/qgnet_synthetic.yaml: the main backbone stands in for the prior extractor."""
    cfg = compose_train_cfg(tmp_path, data_dir, ["method=qgnet", "backbone=resnet18", *SHORT])
    assert cfg.method.model.prior_extractor.init == "supervised_copy"
    results = train(cfg)
    assert 0.0 <= results["miou"] <= 1.0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"]["method.fem.init_merge.0.0.weight"].shape[1] == 514


def test_method_qgnet_loads_a_pretrain_export_from_the_config(tmp_path, data_dir):
    torch.save({"state_dict": resnet18_state(5, with_fc=False), "arch": "resnet18"}, tmp_path / "export.pth")
    opts = "method.model.prior_extractor"
    cfg = compose_train_cfg(tmp_path, data_dir, [
        "method=qgnet", "backbone=resnet18", f"{opts}.init=weights", f"{opts}.name=resnet18",
        f"{opts}.weights={tmp_path / 'export.pth'}",
    ])  # fmt: skip
    model = instantiate(cfg.method.model)
    assert torch.equal(
        model.prior_extractor.body.state_dict()["conv1.weight"], resnet18_state(5)["conv1.weight"]
    )


def test_qgnet_presets():
    cfg = compose_config("train", ["experiment=qgnet_pascal_r50", "fold=1"])
    assert cfg.backbone.name == "resnet50_psp" and cfg.backbone.frozen and cfg.backbone.bn_mode == "train"
    pe = cfg.method.model.prior_extractor
    assert (
        pe.name == "resnet50_dilated"
        and pe.init == "weights"
        and pe.encoder == "encoder_k"
        and pe.bn_mode == "eval"
    )
    assert list(cfg.method.model.bins) == [60, 30, 15, 8] and cfg.method.optimizer.lr == 0.025
    assert cfg.data.batch_size == 4 and cfg.data.num_test_episodes == 5000 and cfg.trainer.max_epochs == 200
    with pytest.raises(Exception, match="python -m fewshotseg.pretrain") as err:  # no extractor file given
        build_on_meta(cfg)
    assert isinstance(_user_error(err.value), ConfigError)  # what the CLI prints as one line
    model = build_on_meta(cfg, prior_extractor={"init": "random"})
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 20_255_242
    coco = compose_config("train", ["experiment=qgnet_coco_r50"])
    assert (
        coco.method.optimizer.lr == 0.2
        and coco.data.batch_size == 32
        and coco.data.num_test_episodes == 20000
    )
    assert list(coco.method.model.bins) == [1.0, 0.5, 0.25, 0.125] and coco.data.fold_split == "interleaved"
    assert compose_config("train", ["method=qgnet", "data=pascal"]).data.num_test_episodes == 5000


def test_random_weights_warning_only_for_init_random(tmp_path, caplog):
    """The prior extractor is frozen either way; only with init=random are its weights random (the
    tiny main backbone may warn too: counted against init=supervised_copy, which builds no extractor)."""
    torch.save({"state_dict": resnet18_state(3, with_fc=False), "arch": "resnet18"}, tmp_path / "export.pth")

    def warnings(init):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fewshotseg.backbones"):
            model = tiny_qgnet({"init": init, "weights": str(tmp_path / "export.pth")})
        return model, sum("random weights" in r.getMessage() for r in caplog.records)

    _, main_only = warnings("supervised_copy")
    for init, extra in (("random", 1), ("weights", 0), ("checkpoint", 0)):
        model, n = warnings(init)
        assert n == main_only + extra, init
        assert model.prior_extractor.frozen
        assert not any(p.requires_grad for p in model.prior_extractor.parameters())
