"""PFENet and the shared PFENet-family pieces (PFENet MAP, training-free prior, mid projection):
references computed another way, shapes for K in {1, 2}, degenerate masks, weight conversion, CLI.
CPU, tiny inputs."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F

from fewshotseg.backbones import Backbone
from fewshotseg.errors import ConfigError
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.pfenet import PFENet, convert_official_state, to_official_state
from fewshotseg.modules.projection import mid_projection
from fewshotseg.ops.prior import max_cosine_map, training_free_prior
from fewshotseg.ops.prototypes import masked_average_pool, weighted_gap
from fewshotseg.train import train
from helpers import SHORT, SIZE, build_on_meta, compose_config, compose_train_cfg, episode, tiny_backbone

# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def test_weighted_gap_matches_loop_and_empty_mask_gives_zero():
    g = torch.Generator().manual_seed(0)
    feat, mask = torch.randn(3, 4, 5, 6, generator=g), (torch.rand(3, 5, 6, generator=g) > 0.5).float()
    mask[2] = 0
    proto = weighted_gap(feat, mask)
    for n in range(3):  # sum over the masked positions, divided by the area + 5e-4
        expected = feat[n][:, mask[n] > 0].sum(1) / (mask[n].sum() + 5e-4)
        torch.testing.assert_close(proto[n], expected)
    assert proto[2].abs().max() == 0
    torch.testing.assert_close(weighted_gap(feat, mask[:, None]), proto)  # [N,1,h,w] masks too
    # eps is the PFENet one (5e-4), not PANet's (1e-5): a one-pixel mask shows the difference
    one = torch.zeros(1, 5, 6)
    one[0, 2, 3] = 1
    torch.testing.assert_close(weighted_gap(feat[:1], one)[0], feat[0, :, 2, 3] / (1 + 5e-4))
    assert not torch.allclose(weighted_gap(feat[:1], one), masked_average_pool(feat[:1], one))


def test_weighted_gap_resizes_a_larger_mask_with_align_corners():
    feat, mask = torch.randn(2, 3, 5, 5), (torch.rand(2, 1, 17, 17) > 0.3).float()
    small = F.interpolate(mask, size=(5, 5), mode="bilinear", align_corners=True)
    torch.testing.assert_close(weighted_gap(feat, mask), weighted_gap(feat, small))


def _prior_reference(q, s, eps=1e-7):
    """Per image and query position, a plain loop over the support positions (float64)."""
    out = torch.empty(q.shape[0], 1, *q.shape[-2:], dtype=torch.float64)
    for b in range(q.shape[0]):
        qv, sv = q[b].flatten(1).double(), s[b].flatten(1).double()
        c = torch.tensor([max(float(qv[:, i] @ sv[:, j] / (qv[:, i].norm() * sv[:, j].norm() + eps))
                              for j in range(sv.shape[1])) for i in range(qv.shape[1])], dtype=torch.float64)  # fmt: skip
        out[b, 0] = ((c - c.min()) / (c.max() - c.min() + eps)).view(q.shape[-2:])
    return out


def test_prior_matches_a_loop_reference_and_lies_in_unit_range():
    g = torch.Generator().manual_seed(0)
    q, s = torch.randn(2, 8, 4, 5, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    prior = max_cosine_map(q.double(), s.double())
    torch.testing.assert_close(prior, _prior_reference(q, s))
    assert prior.min() >= 0 and prior.max() <= 1
    assert torch.isclose(prior.amin((1, 2, 3)), torch.zeros(2, dtype=torch.float64)).all()
    assert torch.isclose(prior.amax((1, 2, 3)), torch.ones(2, dtype=torch.float64)).all()


def test_prior_averages_shots_after_resizing():
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 3, 8, 4, 4, generator=g)
    prior = training_free_prior(q, s, (7, 7))
    per_shot = [F.interpolate(max_cosine_map(q, s[:, k]), size=(7, 7), mode="bilinear", align_corners=True)
                for k in range(3)]  # fmt: skip
    assert prior.shape == (2, 1, 7, 7)
    torch.testing.assert_close(prior, torch.stack(per_shot).mean(0))
    torch.testing.assert_close(training_free_prior(q, s[:, 0], (4, 4)), max_cosine_map(q, s[:, 0]))


def test_prior_guards_constant_maps_and_empty_masks():
    q = torch.randn(2, 8, 4, 4)
    # identical query and key positions: every max cosine is 1, a constant map -> 0, not NaN
    same = torch.ones(2, 8, 4, 4)
    assert torch.equal(max_cosine_map(same, same), torch.zeros(2, 1, 4, 4))
    empty = torch.zeros(2, 2, 8, 4, 4)  # masked-out supports (empty masks)
    prior = training_free_prior(q, empty, (4, 4))
    assert torch.isfinite(prior).all() and prior.abs().max() == 0
    # a zero query (e.g. a black image after ReLU) is finite too
    assert torch.isfinite(training_free_prior(torch.zeros_like(q), torch.randn(2, 8, 4, 4), (4, 4))).all()


def test_mid_projection_is_pfenets_down_query():
    proj = mid_projection(1536)
    assert [type(m).__name__ for m in proj] == ["Conv2d", "ReLU", "Dropout2d"]
    assert proj[0].in_channels == 1536 and proj[0].out_channels == 256 and proj[0].bias is None
    assert proj[2].p == 0.5
    x = torch.randn(2, 1536, 3, 3)
    torch.testing.assert_close(proj.eval()(x), F.relu(F.conv2d(x, proj[0].weight)))


# ------------------------------------------------------------------------------------------------
# PFENet
# ------------------------------------------------------------------------------------------------


def tiny_pfenet(bn_mode="eval", **kwargs):
    return PFENet(tiny_backbone(bn_mode), bins=[1.0, 0.5, 0.25, 0.125], reduce_dim=32, **kwargs)


def official_style_forward(model, batch):
    """PFENet's forward written as the official code is (a loop over shots, the stages run one after
    the other, `Weighted_GAP` via avg_pool2d, the prior as explicit bmm), with the model's modules."""
    x, s_x, s_y = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    bb = model.backbone

    def stages(img):
        feats = bb(img)
        return feats[2], feats[3], feats[4]

    q2, q3, q4 = stages(x)
    query_feat = model.down_query(torch.cat([q3, q2], 1))
    protos, priors = [], []
    for i in range(s_x.shape[1]):
        mask_full = (s_y[:, i] == 1).float().unsqueeze(1)
        s2, s3, _ = stages(s_x[:, i])
        mask = F.interpolate(mask_full, size=s3.shape[-2:], mode="bilinear", align_corners=True)
        s4 = bb.run_stage(s3 * mask, 4)
        feat = model.down_supp(torch.cat([s3, s2], 1)) * mask
        h, w = feat.shape[-2:]
        area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
        protos.append(F.avg_pool2d(feat, (h, w)) * h * w / area)
        q, s = q4.flatten(2), (s4 * mask).flatten(2).permute(0, 2, 1)
        sim = torch.bmm(s, q) / (torch.bmm(s.norm(2, 2, True), q.norm(2, 1, True)) + 1e-7)
        sim = sim.max(1)[0]
        lo, hi = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
        priors.append(((sim - lo) / (hi - lo + 1e-7)).view(-1, 1, *q4.shape[-2:]))
    prior = torch.cat(priors, 1).mean(1, keepdim=True)
    proto = torch.stack(protos).mean(0)[:, :, 0, 0]
    out, _ = model.fem(query_feat, vectors=proto, maps=prior)
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)


@pytest.mark.parametrize("name", ["resnet50_psp", "resnet101_psp"])
def test_trainable_parameters_match_official(name):
    with torch.device("meta"):
        model = PFENet(functools.partial(Backbone, name=name, frozen=True), bins=[60, 30, 15, 8])
    # the official model's down_query, down_supp, init_merge, alpha/beta_conv, inner_cls, res1/2, cls
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_817_034
    assert [m[0].in_channels for m in model.fem.init_merge] == [513] * 4
    assert model.down_query[0].in_channels == model.down_supp[0].in_channels == 1024 + 512


@pytest.mark.parametrize("K", [1, 2])
def test_forward_equals_the_official_structure(K):
    torch.manual_seed(0)
    model = tiny_pfenet().eval()
    batch = episode(K=K, seed=K)
    with torch.no_grad():
        logits, aux = model(batch)
        expected = official_style_forward(model, batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and aux == {}
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [1, 2])
def test_training_step(K):
    torch.manual_seed(0)
    model = tiny_pfenet().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batch = episode(K=K)
    logits, aux = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and set(aux) == {"aux"}
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen
    # both projections learn: unlike ASGNet, the prototypes carry gradient (official)
    assert model.down_query[0].weight.grad.abs().sum() > 0
    assert model.down_supp[0].weight.grad.abs().sum() > 0
    before = model.fem.cls[-1].weight.clone()
    opt.step()
    assert not torch.equal(before, model.fem.cls[-1].weight)


def test_eval_needs_no_query_mask_and_batching_changes_nothing():
    torch.manual_seed(0)
    model = tiny_pfenet().eval()
    batch = episode(B=3, K=2, seed=3)
    del batch["query_mask"]
    batch["support_masks"][1, 0] = 0  # an empty shot
    with torch.no_grad():
        together, aux = model(batch)
        alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(3)])
    assert aux == {}
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_bn_train_mode_calls_the_backbone_per_shot_as_the_official_code():
    """Query: stem..layer4 once; each shot: stem..layer3 once, layer4 once on the masked layer3 (the
    unmasked support never reaches layer4)."""
    model = tiny_pfenet(bn_mode="train").train()
    batch = episode(K=3)
    model(batch)
    state = model.backbone.body.state_dict()
    assert state["bn1.num_batches_tracked"] == 1 + 3
    assert state["layer3.0.bn1.num_batches_tracked"] == 1 + 3
    assert state["layer4.0.bn1.num_batches_tracked"] == 1 + 3
    # eval mode BN: the shots go through together and the statistics never move
    model = tiny_pfenet(bn_mode="eval").train()
    model(batch)
    assert model.backbone.body.state_dict()["bn1.num_batches_tracked"] == 0


@pytest.mark.parametrize("case", ["empty", "one_pixel", "all_ignore"])
def test_degenerate_supports_give_finite_loss(case):
    torch.manual_seed(0)
    model = tiny_pfenet().train()
    batch = episode(K=2)
    if case == "empty":
        batch["support_masks"][:] = 0
    elif case == "one_pixel":
        batch["support_masks"][:] = 0
        batch["support_masks"][:, :, 32, 32] = 1
    else:
        batch["support_masks"][:] = 255
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n_tensors", [("resnet50_psp", 365), ("resnet101_psp", 671)])
def test_official_names_round_trip_and_match_the_authors_layout(name, n_tensors):
    with torch.device("meta"):
        model = PFENet(functools.partial(Backbone, name=name, frozen=True), bins=[60, 30, 15, 8])
    ours = model.state_dict()
    official = to_official_state(ours)
    # the authors' model: PSPNet stem as layer0 (indices 0, 1, 3, 4, 6, 7), heads at the top level
    assert {"layer0.0.weight", "layer0.7.running_var", "layer4.2.conv3.weight", "down_query.0.weight",
            "init_merge.3.0.weight", "alpha_conv.2.0.weight", "inner_cls.0.3.bias", "cls.3.bias"} <= set(official)  # fmt: skip
    assert len(official) == n_tensors  # as many tensors as the official PFENet state dict
    back = convert_official_state({"module." + k: v for k, v in official.items()})  # DataParallel prefix
    assert list(back) == list(ours)
    model.load_state_dict(back, strict=True, assign=True)


def test_convert_names_missing_and_unmapped_keys():
    with torch.device("meta"):
        model = PFENet(functools.partial(Backbone, name="resnet50_psp", frozen=True), bins=[60, 30, 15, 8])
    official = to_official_state(model.state_dict())
    for key in ("init_merge.2.0.weight", "layer2.1.bn2.running_var", "layer0.4.weight"):
        with pytest.raises(ConfigError, match=re.escape(key)):
            convert_official_state({k: v for k, v in official.items() if k != key})
    with pytest.raises(ConfigError, match="down_learn_super"):
        convert_official_state({**official, "down_learn_super.0.weight": official["down_query.0.weight"]})
    with pytest.raises(ConfigError, match="no official PFENet name"):
        to_official_state({**model.state_dict(), "extra.weight": official["down_query.0.weight"]})


# ------------------------------------------------------------------------------------------------
# Configs and the command line
# ------------------------------------------------------------------------------------------------


def test_method_pfenet_trains_and_tests_from_the_config(tmp_path, data_dir):
    results = train(compose_train_cfg(tmp_path, data_dir, ["method=pfenet", "backbone=resnet18", *SHORT]))
    assert 0.0 <= results["miou"] <= 1.0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert state["state_dict"]["method.fem.init_merge.0.0.weight"].shape[1] == 513


@pytest.mark.parametrize("name,backbone,weights", [
    ("pfenet_pascal_r50", "resnet50_psp", "initmodel/resnet50_v2.pth"),
    ("pfenet_pascal_r101", "resnet101_psp", "initmodel/resnet101_v2.pth"),
])  # fmt: skip
def test_pfenet_pascal_presets(name, backbone, weights):
    cfg = compose_config("train", [f"experiment={name}", "shot=5", "fold=3"])
    assert cfg.backbone.name == backbone and cfg.backbone.weights.endswith(weights)
    assert cfg.backbone.frozen and cfg.backbone.bn_mode == "train" and cfg.seed == 321
    assert cfg.data.source._target_.endswith("PascalVOC") and cfg.data.protocol == "pfenet"
    assert list(cfg.method.model.bins) == [60, 30, 15, 8] and list(cfg.method.model.mid_levels) == [3, 2]
    assert cfg.method.optimizer.lr == 0.025 and cfg.method.optimizer.weight_decay == 1e-4
    assert cfg.method.scheduler._target_ == "fewshotseg.schedules.poly" and cfg.method.scheduler.power == 0.9
    assert cfg.data.batch_size == 4 and cfg.trainer.max_epochs == 200
    assert cfg.data.num_test_episodes == 5000  # the authors' test.py
    assert cfg.shot == 5 and cfg.data.shot == 5 and cfg.data.fold == 3
    model = build_on_meta(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_817_034


@pytest.mark.parametrize(
    "name,backbone", [("pfenet_coco_r101", "resnet101_psp"), ("pfenet_coco_r50", "resnet50_psp")]
)
def test_pfenet_coco_presets(name, backbone):
    cfg = compose_config("train", [f"experiment={name}"])
    assert cfg.backbone.name == backbone and cfg.data.fold_split == "interleaved"
    assert list(cfg.method.model.bins) == [1.0, 0.5, 0.25, 0.125]
    assert cfg.method.optimizer.lr == 0.2 and cfg.data.batch_size == 32  # base_lr 0.02 x 10 at batch 32
    assert cfg.data.num_test_episodes == 20000 and cfg.trainer.max_epochs == 50
    assert cfg.data.protocols.pfenet.size == 641


def test_method_and_data_alone_take_the_paper_setting():
    cfg = compose_config("train", ["method=pfenet", "data=pascal"])
    assert list(cfg.method.model.bins) == [60, 30, 15, 8] and cfg.data.num_test_episodes == 5000
    assert cfg.backbone.name == "resnet50_psp" and cfg.seed == 321
    assert (
        compose_config("train", ["method=pfenet", "data=pascal", "backbone=resnet18"]).backbone.name
        == "resnet18"
    )
