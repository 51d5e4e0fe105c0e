"""DPNet (reconstructed, docs/methods/dpnet.md): the CCM against a loop reference, its fallbacks and the
cycle check, PIM, shapes and training steps for K in {1, 2}, the training-only auxiliary branch,
degenerate masks, the switches, weight names, presets and a CLI run. CPU, tiny."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from fewshotseg.backbones import Backbone
from fewshotseg.errors import ConfigError
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.dpnet import (
    FALLBACK_NONE,
    FALLBACK_SUPPORT,
    FALLBACK_TOPK,
    PIM,
    CCMConfig,
    DPNet,
    cycle_comparison,
)
from fewshotseg.train import train
from helpers import SIZE, build_on_meta, compose_config, compose_train_cfg, episode

# ------------------------------------------------------------------------------------------------
# CCM
# ------------------------------------------------------------------------------------------------


def ccm_reference(q, s, m, proto, cfg: CCMConfig):
    """One image, plain Python over positions (float64): q [C,h,w], s [K,C,h,w], m [K,h,w], proto [C]
    -> (Pq [C], R [h,w] bool, fallback)."""
    C, h, w = q.shape
    qv = q.reshape(C, -1).T  # [hw, C]
    sv = s.permute(0, 2, 3, 1).reshape(-1, C)  # all shots' positions, shot-major
    mv = m.reshape(-1)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    raw = torch.tensor([cos(qv[i], proto) for i in range(h * w)], dtype=torch.float64)
    score = (raw - raw.min()) / (raw.max() - raw.min() + 1e-7)
    reliable = []
    for i in range(h * w):
        ok = score[i] >= cfg.tau_f
        if cfg.use_backward_check:
            j = max(range(len(sv)), key=lambda j: cos(qv[i], sv[j]))
            ok = ok and mv[j] >= cfg.mask_threshold
        reliable.append(bool(ok))
    reliable = torch.tensor(reliable)
    if reliable.sum() >= cfg.k_min:
        return qv[reliable].mean(0), reliable.view(h, w), FALLBACK_NONE
    if m.sum() <= 0:
        return proto, torch.zeros(h, w, dtype=torch.bool), FALLBACK_SUPPORT
    top = torch.zeros(h * w, dtype=torch.bool)
    top[score.topk(cfg.k_min).indices] = True
    return qv[top].mean(0), top.view(h, w), FALLBACK_TOPK


def random_ccm_inputs(B=3, K=2, C=6, h=5, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    s = torch.randn(B, K, C, h, w, generator=g, dtype=torch.float64)
    m = (torch.rand(B, K, 1, h, w, generator=g, dtype=torch.float64) > 0.5).double()
    proto = (s * m).sum((3, 4)).div(m.sum((3, 4)) + 5e-4).mean(1)
    return q, s, m, proto


@pytest.mark.parametrize(
    "cfg",
    [CCMConfig(), CCMConfig(tau_f=0.3, k_min=3), CCMConfig(use_backward_check=False, tau_f=0.7, k_min=2)],
)
def test_ccm_matches_a_loop_reference(cfg):
    q, s, m, proto = random_ccm_inputs()
    out = cycle_comparison(q, s, m, proto, cfg)
    assert out.pseudo.shape == (3, 6) and out.reliable.shape == (3, 1, 5, 4)
    for b in range(3):
        pseudo, reliable, fallback = ccm_reference(q[b], s[b], m[b, :, 0], proto[b], cfg)
        assert out.fallback[b].item() == fallback
        assert torch.equal(out.reliable[b, 0].bool(), reliable)
        torch.testing.assert_close(out.pseudo[b], pseudo)


def test_ccm_uses_the_top_k_fallback_when_few_positions_are_reliable():
    q, s, m, proto = random_ccm_inputs(B=2, K=1, h=6, w=6, seed=3)
    out = cycle_comparison(q, s, m, proto, CCMConfig(tau_f=1.0, k_min=5))  # only the maximum passes
    assert (out.fallback == FALLBACK_TOPK).all()
    assert (out.reliable.flatten(1).sum(1) == 5).all()
    score = F.cosine_similarity(q, proto[:, :, None, None], dim=1).flatten(1)
    top = score.topk(5, dim=1).indices
    assert out.reliable.flatten(1).gather(1, top).all()


def test_all_background_support_gives_an_empty_reliable_set_and_the_fallback():
    q, s, m, _ = random_ccm_inputs(B=2, K=2)
    m = torch.zeros_like(m)
    proto = (s * m).sum((3, 4)).div(m.sum((3, 4)) + 5e-4).mean(1)  # PFENet MAP of an empty mask: 0
    out = cycle_comparison(q, s, m, proto, CCMConfig())
    assert out.reliable.sum() == 0
    assert (out.fallback == FALLBACK_SUPPORT).all()
    assert torch.equal(out.pseudo, proto) and not out.pseudo.isnan().any()


def test_query_equal_to_support_the_backward_check_selects_only_foreground():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 1, 8, 6, 6, generator=g)
    m = torch.zeros(2, 1, 1, 6, 6)
    m[0, 0, 0, 1:4, 1:5] = 1
    m[1, 0, 0, 2:6, 0:3] = 1
    q = s[:, 0].clone()
    proto = (s * m).sum((3, 4)).div(m.sum((3, 4)) + 5e-4).mean(1)
    fg = m[:, 0].bool()
    # the backward check alone (no forward threshold): exactly the support foreground
    alone = cycle_comparison(q, s, m, proto, CCMConfig(tau_f=0.0, k_min=1))
    assert torch.equal(alone.reliable.bool(), fg) and (alone.fallback == FALLBACK_NONE).all()
    # with the forward threshold: a subset of it
    both = cycle_comparison(q, s, m, proto, CCMConfig(tau_f=0.5, k_min=1))
    assert not (both.reliable.bool() & ~fg).any()
    # without the backward check the forward threshold also lets background in
    forward_only = cycle_comparison(q, s, m, proto, CCMConfig(tau_f=0.5, k_min=1, use_backward_check=False))
    assert (forward_only.reliable.bool() & ~fg).any()


def test_ccm_passes_gradient_through_the_averaged_query_features_only():
    q, s, m, proto = random_ccm_inputs(B=1, K=1)
    q.requires_grad_(True)
    s.requires_grad_(True)
    out = cycle_comparison(q, s, m, proto, CCMConfig(k_min=1))
    out.pseudo.sum().backward()
    n = out.reliable.sum()
    torch.testing.assert_close(q.grad, out.reliable.expand_as(q) / n)  # d mean / d F_q = R / |R|
    assert s.grad is None  # the selection is not differentiable


# ------------------------------------------------------------------------------------------------
# PIM
# ------------------------------------------------------------------------------------------------


def test_pim_leaves_orthogonal_prototypes_unchanged():
    torch.manual_seed(0)
    pim = PIM(dim=4, hidden=3)
    proto = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    pseudo = torch.tensor([[0.0, 0.0, 1.0, -1.0], [2.0, 1.0, 0.0, 5.0]])  # orthogonal to proto
    q = torch.randn(2, 4, 3, 3)
    p2, pq2, q2 = pim(proto, pseudo, q)
    torch.testing.assert_close(p2, proto)
    torch.testing.assert_close(pq2, pseudo)
    g = torch.sigmoid(pim.gate(torch.cat([proto, pseudo], 1)))
    torch.testing.assert_close(q2, q * (1 + g[:, :, None, None]))  # the query is still reinforced
    # a correlated pair is reinforced: P' = P + rho g * Pq with rho = cos(P, Pq)
    p3, pq3, _ = pim(proto, proto * 2, q)
    g3 = torch.sigmoid(pim.gate(torch.cat([proto, proto * 2], 1)))
    torch.testing.assert_close(p3, proto + g3 * proto * 2)
    torch.testing.assert_close(pq3, proto * 2 + g3 * proto)


# ------------------------------------------------------------------------------------------------
# DPNet
# ------------------------------------------------------------------------------------------------


def tiny_dpnet(bn_mode="eval", frozen=False, **kwargs):
    backbone = functools.partial(Backbone, name="resnet18", bn_mode=bn_mode, frozen=frozen)
    return DPNet(backbone, bins=[1.0, 0.5, 0.25, 0.125], **kwargs)


def loss_of(logits, aux, batch):
    return segmentation_loss(logits, batch["query_mask"]) + sum(aux.values())


@pytest.mark.parametrize("K", [1, 2])
def test_training_step_shapes_and_gradients(K):
    torch.manual_seed(0)
    model = tiny_dpnet().train()
    batch = episode(K=K)
    logits, aux = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and set(aux) == {"aux", "cycle"}
    loss = loss_of(logits, aux, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for name in ("down_query", "down_supp", "pim.gate", "fem.cls"):  # every learnable part learns
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_widths_follow_the_switches():
    def build(**kwargs):
        with torch.device("meta"):  # shapes only
            return tiny_dpnet(**kwargs)

    default = build()
    assert default.fem.init_merge[0][0].in_channels == 3 * 256 + 3  # 771
    assert default.down_query[0].in_channels == 256 + 128  # resnet18 levels 3 + 2
    assert build(msf={"use_reliability_map": False}).fem.init_merge[0][0].in_channels == 770
    with_prior = build(msf={"use_pfenet_prior": True})
    assert with_prior.fem.init_merge[0][0].in_channels == 772
    assert 4 in with_prior.backbone.levels and 4 not in default.backbone.levels
    assert build(pim={"enabled": False}).pim is None
    assert build(pim={"hidden": 16}).pim.gate[0].out_features == 16


@pytest.mark.parametrize("kwargs,message", [
    ({"ccm": {"tau": 0.5}}, "method.model.ccm: unknown keys ['tau']"),
    ({"ccm": {"tau_f": 1.5}}, "tau_f=1.5"),
    ({"ccm": {"k_min": 0}}, "k_min=0"),
    ({"aux": 3}, "method.model.aux: expected a mapping"),
])  # fmt: skip
def test_bad_switches_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_dpnet(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ccm": {"use_backward_check": False}},
        {"pim": {"enabled": False}},
        {"aux": {"enabled": False}},
        {"msf": {"use_reliability_map": False}},
        {"msf": {"use_pfenet_prior": True}},
    ],
)
def test_ablations_and_prior_train(kwargs):
    torch.manual_seed(0)
    batch = episode(K=2)
    model = tiny_dpnet(**kwargs).train()
    logits, aux = model(batch)
    loss = loss_of(logits, aux, batch)
    loss.backward()
    assert logits.shape == (2, 2, SIZE, SIZE) and torch.isfinite(loss)
    assert model.fem.cls[-1].weight.grad.abs().sum() > 0


def test_auxiliary_branch_is_absent_from_eval_and_when_switched_off(monkeypatch):
    calls = []
    real = DPNet.cycle_loss

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(DPNet, "cycle_loss", spy)
    torch.manual_seed(0)
    batch = episode(K=2)
    model = tiny_dpnet().eval()
    eval_batch = {k: v for k, v in batch.items() if k != "query_mask"}
    with torch.no_grad():
        logits, aux = model(eval_batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and aux == {} and not calls
    off = tiny_dpnet(aux={"enabled": False}).train()
    _, aux = off(batch)
    assert set(aux) == {"aux"} and not calls
    _, aux = model.train()(batch)
    assert "cycle" in aux and len(calls) == 1


def test_cycle_loss_is_support_ce_of_background_and_pseudo_prototypes():
    """The branch against a direct computation: 20 cos to [MAP(query outside R), Pq], upsampled, CE."""
    torch.manual_seed(0)
    model = tiny_dpnet()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 9, 9, generator=g)
    reliable = (torch.rand(2, 1, 9, 9, generator=g) > 0.6).float()
    pseudo = torch.randn(2, 8, generator=g)
    s = torch.randn(4, 8, 9, 9, generator=g)
    labels = torch.randint(0, 2, (2, 2, 17, 17), generator=g)
    labels[:, :, 0] = 255
    expected = []
    for b in range(2):
        bg = (q[b] * (1 - reliable[b])).sum((1, 2)) / ((1 - reliable[b]).sum() + 5e-4)
        for k in range(2):
            feat = s[2 * b + k]
            logit = torch.stack(
                [20 * F.cosine_similarity(feat, p[:, None, None], dim=0) for p in (bg, pseudo[b])]
            )
            up = F.interpolate(logit[None], size=(17, 17), mode="bilinear", align_corners=True)
            expected.append(F.cross_entropy(up, labels[b, k][None], ignore_index=255, reduction="sum"))
    expected = torch.stack(expected).sum() / (labels != 255).sum()
    torch.testing.assert_close(model.cycle_loss(q, reliable, pseudo, s, labels), expected)


def _set_masks(batch, case):
    if case == "empty support":
        batch["support_masks"][:] = 0
    elif case == "one-pixel support":
        batch["support_masks"][:] = 0
        batch["support_masks"][:, :, 30, 30] = 1
    elif case == "all-ignored support":
        batch["support_masks"][:] = 255
    elif case == "empty query":
        batch["query_mask"][:] = 0
    elif case == "all-ignored query":
        batch["query_mask"][:] = 255
    return batch


@pytest.mark.parametrize(
    "case", ["empty support", "one-pixel support", "all-ignored support", "empty query", "all-ignored query"]
)
def test_degenerate_masks_give_finite_losses_and_gradients(case):
    torch.manual_seed(0)
    model = tiny_dpnet().train()
    batch = _set_masks(episode(K=2), case)
    logits, aux = model(batch)
    loss = loss_of(logits, aux, batch)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in aux.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batched_equals_one_episode_at_a_time():
    torch.manual_seed(0)
    model = tiny_dpnet().eval()
    batch = episode(B=2, K=2, seed=4)
    with torch.no_grad():
        together = model(batch)[0]
        apart = torch.cat([model({k: v[b : b + 1] for k, v in batch.items()})[0] for b in range(2)])
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bn_mode,calls", [("train", 1 + 2), ("eval", 2)])
def test_backbone_passes_follow_the_bn_mode(bn_mode, calls, monkeypatch):
    model = tiny_dpnet(bn_mode=bn_mode, frozen=True).train()
    seen = []
    real = type(model.backbone).forward
    monkeypatch.setattr(
        type(model.backbone), "forward", lambda self, x, **kw: seen.append(x.shape[0]) or real(self, x, **kw)
    )
    model(episode(B=2, K=2))
    assert len(seen) == calls  # batch statistics: query + one call per shot, as PFENet


def test_weight_names_are_our_own():
    """No DPNet code or checkpoint was released (docs/methods/dpnet.md): its contract declares no
    official names, so `weights=` is a one-line error; its tensors are under its own modules."""
    from fewshotseg.runs import official_state

    assert DPNet.official_names is None
    state = tiny_dpnet().state_dict()
    assert {k.split(".", 1)[0] for k in state} == {"backbone", "down_query", "down_supp", "pim", "fem"}
    with pytest.raises(ConfigError, match="declares no official names"):
        official_state(compose_config("train", ["method=dpnet"]), "released.pth")


# ------------------------------------------------------------------------------------------------
# Configs and the command line
# ------------------------------------------------------------------------------------------------


def test_pascal_experiment_and_switches_from_the_command_line():
    cfg = compose_config("train", ["experiment=dpnet_pascal_r50", "shot=5", "fold=1", "method.model.ccm.k_min=4",
                         "method.model.ccm.use_backward_check=false", "method.model.pim.enabled=false"])  # fmt: skip
    assert cfg.backbone.name == "resnet50_psp" and cfg.backbone.frozen and cfg.backbone.bn_mode == "train"
    assert cfg.data.protocol == "pfenet" and cfg.data.batch_size == 4 and cfg.trainer.max_epochs == 200
    assert cfg.method.optimizer.lr == 0.025 and cfg.method.scheduler.power == 0.9
    assert dict(cfg.method.aux_weights) == {"aux": 1.0, "cycle": 1.0}
    model = build_on_meta(cfg)
    assert model.ccm_cfg == CCMConfig(k_min=4, use_backward_check=False) and model.pim is None
    assert model.fem.bins == (60, 30, 15, 8) and model.down_query[0].in_channels == 1536
    assert (
        compose_config("train", ["experiment=dpnet_pascal_r50", "backbone=resnet18"]).backbone.name
        == "resnet18"
    )


def test_coco_experiment_and_the_automatic_presets():
    cfg = compose_config("train", ["experiment=dpnet_coco_r50"])
    assert cfg.method.optimizer.lr == 0.05 and cfg.data.batch_size == 8 and cfg.trainer.max_epochs == 50
    assert list(cfg.method.model.bins) == [1.0, 0.5, 0.25, 0.125] and cfg.data.fold_split == "interleaved"
    assert cfg.data.protocols.pfenet.size == 641
    pascal = compose_config("train", ["method=dpnet", "data=pascal"])  # conf/preset/dpnet_pascal.yaml
    assert (
        list(pascal.method.model.bins) == [60, 30, 15, 8]
        and pascal.seed == 321
        and pascal.data.batch_size == 4
    )
    assert compose_config("train", ["method=dpnet", "data=coco"]).method.optimizer.lr == 0.05
    synthetic = compose_config("train", ["method=dpnet", "backbone=resnet18"])
    assert (
        list(synthetic.method.model.bins) == [1.0, 0.5, 0.25, 0.125] and synthetic.backbone.name == "resnet18"
    )


def test_cli_trains_on_synthetic_with_resnet18(tmp_path, data_dir):
    short = ["method=dpnet", "backbone=resnet18", "test=false", "trainer.limit_train_batches=2",
             "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0"]  # fmt: skip
    cfg = compose_train_cfg(tmp_path, data_dir, short)
    assert cfg.method.model._target_ == "fewshotseg.methods.dpnet.DPNet"
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/cycle" in metrics and "train/aux" in metrics
