"""ASGNet and the shared FEM decoder: parameter count, training steps (1- and 5-shot), batching over
episodes and shots, degenerate support masks, BatchNorm passes, clustering iterations. CPU, tiny."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fewshotseg.methods.asgnet as asgnet_module
from fewshotseg.backbones import Backbone
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.asgnet import ASGNet
from fewshotseg.modules.fem import FEM, bin_size, inner_loss
from fewshotseg.ops.superpixel import place_seeds, place_seeds_batch, seed_grid_shape
from helpers import SIZE, episode

# ------------------------------------------------------------------------------------------------
# FEM
# ------------------------------------------------------------------------------------------------


def test_bin_sizes_relative_and_absolute():
    assert [bin_size(b, 81, 81) for b in (1.0, 0.5, 0.25, 0.125)] == [(81, 81), (40, 40), (20, 20), (10, 10)]
    assert [bin_size(b, 81, 81) for b in (81, 40, 20, 10)] == [(81, 81), (40, 40), (20, 20), (10, 10)]
    assert [bin_size(b, 60, 60) for b in (60, 30, 15, 8)] == [(60, 60), (30, 30), (15, 15), (8, 8)]
    assert bin_size(0.125, 5, 9) == (1, 1)  # never 0 x 0 on tiny maps


def test_fem_shapes_and_widths():
    fem = FEM(513, bins=[1.0, 0.5, 0.25, 0.125])
    assert [m[0].in_channels for m in fem.init_merge] == [513] * 4
    out, inner = fem(torch.randn(2, 512, 9, 9), maps=torch.rand(2, 1, 9, 9))
    assert out.shape == (2, 2, 9, 9)
    assert [tuple(x.shape[-2:]) for x in inner] == [(9, 9), (4, 4), (2, 2), (1, 1)]


def test_fem_vectors_are_tiled_prototypes():
    """PFENet passes the prototype as a vector: the same as a tiled map pooled per bin."""
    torch.manual_seed(0)
    fem = FEM(2 * 16 + 1, bins=[1.0, 0.5], reduce_dim=8).eval()
    q, proto, prior = torch.randn(2, 16, 6, 6), torch.randn(2, 16), torch.rand(2, 1, 6, 6)
    out_v, inner_v = fem(q, vectors=proto, maps=prior)
    out_t, inner_t = fem(torch.cat([q, proto[:, :, None, None].expand(-1, -1, 6, 6)], 1), maps=prior)
    torch.testing.assert_close(out_v, out_t)
    for a, b in zip(inner_v, inner_t, strict=True):
        torch.testing.assert_close(a, b)


def test_inner_loss_is_mean_of_per_bin_ce_and_never_nan():
    g = torch.Generator().manual_seed(0)
    inner = [torch.randn(2, 2, s, s, generator=g) for s in (9, 4, 2)]
    target = torch.randint(0, 2, (2, 17, 17), generator=g)
    target[:, 0] = 255
    expected = torch.stack([
        F.cross_entropy(F.interpolate(x, size=(17, 17), mode="bilinear", align_corners=True), target, ignore_index=255)
        for x in inner
    ]).mean()  # fmt: skip
    torch.testing.assert_close(inner_loss(inner, target), expected)
    assert inner_loss(inner, torch.full_like(target, 255)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# ASGNet
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50_psp", "resnet101_psp"])
def test_trainable_parameters_match_official(name):
    with torch.device("meta"):
        model = ASGNet(functools.partial(Backbone, name=name, frozen=True), bins=[60, 30, 15, 8])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_423_818
    assert model.down_conv[0].in_channels == 1536 and model.down_conv[0].bias is None
    assert [type(m).__name__ for m in model.down_conv] == ["Conv2d", "Dropout2d"]  # no ReLU


def tiny_asgnet(**kwargs):
    backbone = functools.partial(Backbone, name="resnet18", bn_mode=kwargs.pop("bn_mode", "eval"),
                                 frozen=kwargs.pop("frozen", False))  # fmt: skip
    # avg_sp_area 10: superpixels appear on the 9x9 grid of a 65 px input
    return ASGNet(backbone, bins=[1.0, 0.5, 0.25, 0.125], avg_sp_area=10, **kwargs)


@pytest.fixture
def clustering_spy(monkeypatch):
    calls = []
    real = asgnet_module.batched_superpixel_clustering

    def spy(feat, mask, seeds, counts, n_iter):
        calls.append({"n_iter": n_iter, "counts": counts.clone(), "n": feat.shape[0]})
        return real(feat, mask, seeds, counts, n_iter)

    monkeypatch.setattr(asgnet_module, "batched_superpixel_clustering", spy)
    return calls


@pytest.mark.parametrize("K", [1, 5])
def test_training_step(K, clustering_spy):
    torch.manual_seed(0)
    model = tiny_asgnet().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batch = episode(K=K)
    logits, aux = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and set(aux) == {"aux"}
    loss = segmentation_loss(logits, batch["query_mask"]) + 1.0 * aux["aux"]
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.down_conv[0].weight.grad.abs().sum() > 0  # trained through the query branch
    before = model.fem.cls[-1].weight.clone()
    opt.step()
    assert not torch.equal(before, model.fem.cls[-1].weight)
    (call,) = clustering_spy
    assert call["n"] == 2 * K and call["n_iter"] == 10
    assert (call["counts"] >= 2).any()  # some supports are clustered, not only pooled


def test_eval_uses_5_iterations_and_needs_no_query_mask(clustering_spy):
    model = tiny_asgnet().eval()
    batch = episode(K=2)
    del batch["query_mask"]
    with torch.no_grad():
        logits, aux = model(batch)
    assert logits.shape == (2, 2, SIZE, SIZE) and aux == {}
    assert clustering_spy[0]["n_iter"] == 5


def test_batched_equals_one_episode_at_a_time():
    """Batching over episodes and shots changes nothing (BN eval, no dropout)."""
    torch.manual_seed(0)
    model = tiny_asgnet().eval()
    batch = episode(B=3, K=2, seed=3)
    batch["support_masks"][1, 0] = 0  # empty support in one shot
    with torch.no_grad():
        together = model(batch)[0]
        alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_seeds_come_from_the_support_masks(monkeypatch):
    model = tiny_asgnet().eval()
    batch = episode(B=2, K=2, seed=1)
    seen = {}
    real = asgnet_module.batched_superpixel_clustering

    def spy(feat, mask, seeds, counts, n_iter):
        seen.update(seeds=seeds, counts=counts, mask=mask)
        return real(feat, mask, seeds, counts, n_iter)

    monkeypatch.setattr(asgnet_module, "batched_superpixel_clustering", spy)
    with torch.no_grad():
        model(batch)
    for i, label in enumerate(batch["support_masks"].flatten(0, 1)):
        expected = place_seeds(label, max_num=5, avg_area=10, stride=8)
        assert seen["counts"][i] == len(expected)
        assert seen["seeds"][i, : len(expected)].tolist() == expected.tolist()
    fg = (batch["support_masks"].flatten(0, 1) == 1).float()[:, None]
    torch.testing.assert_close(
        seen["mask"], F.interpolate(fg, size=(9, 9), mode="bilinear", align_corners=True)
    )


@pytest.mark.parametrize("case", ["empty", "one_pixel", "all_ignore", "far_features"])
def test_degenerate_supports_give_finite_loss(case):
    torch.manual_seed(0)
    model = tiny_asgnet().train()
    batch = episode(K=2)
    if case == "empty":
        batch["support_masks"][:] = 0
    elif case == "one_pixel":
        batch["support_masks"][:] = 0
        batch["support_masks"][:, :, 32, 32] = 1
    elif case == "all_ignore":
        batch["support_masks"][:] = 255
    else:  # huge features: exp(-D) underflows in the official normalisation
        batch["support_imgs"] = batch["support_imgs"] * 1e4
        batch["query_img"] = batch["query_img"] * 1e4
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("bn_mode,calls_train", [("train", 3), ("eval", 2)])
def test_backbone_passes_follow_the_bn_mode(bn_mode, calls_train, monkeypatch):
    """BN in train mode (official): query and each shot in their own backbone call."""
    model = tiny_asgnet(bn_mode=bn_mode, frozen=True).train()
    sizes = []
    real = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x: sizes.append(x.shape[0]) or real(x))
    stats = model.backbone.body.bn1.running_mean.clone()
    model(episode(B=2, K=2))
    assert len(sizes) == calls_train
    assert sizes == ([2, 2, 2] if bn_mode == "train" else [2, 4])
    assert torch.equal(stats, model.backbone.body.bn1.running_mean) == (bn_mode == "eval")
    sizes.clear()
    model.eval()
    with torch.no_grad():
        model(episode(B=2, K=2))
    assert sizes == [2, 4]


def test_frozen_psp_backbone_trains_only_the_head():
    torch.manual_seed(0)
    model = ASGNet(functools.partial(Backbone, name="resnet50_psp", frozen=True, bn_mode="train"),
                   bins=[1.0, 0.5, 0.25, 0.125], avg_sp_area=10).train()  # fmt: skip
    batch = episode(B=1, K=1)
    logits, aux = model(batch)
    (segmentation_loss(logits, batch["query_mask"]) + aux["aux"]).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.fem.parameters())


def test_seeds_follow_the_feature_grid():
    """Seeds go on the feature grid itself: the official stride grid for the paper backbones, any
    grid (native strides, ViT patches) otherwise."""
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, SIZE, SIZE, generator=g) > 0.3).long()
    masks[:, :10] = 0
    by_stride = place_seeds_batch(masks, 5, 5, stride=8)
    by_grid = place_seeds_batch(masks, 5, 5, grid_size=seed_grid_shape(SIZE, SIZE, 8))
    assert all(torch.equal(a, b) for a, b in zip(by_stride, by_grid))
    model = tiny_asgnet()
    protos, valid = model.prototypes(torch.randn(3, 256, 7, 7), masks)  # a 7x7 grid, not the 9x9 rule
    assert protos.shape == (3, 5, 256) and valid.any()
