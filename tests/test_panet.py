import functools

import pytest
import torch
import torch.nn.functional as F

from fewshotseg.backbones import Backbone
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.panet import PANet
from fewshotseg.ops.prototypes import cosine_logits, masked_average_pool
from helpers import episode as shared_episode


def naive_map(feat, mask, eps=1e-5):
    """PANet's getFeatures: upsample the features to the mask size, then pool."""
    up = F.interpolate(feat, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return (up * mask[:, None]).sum((2, 3)) / (mask[:, None].sum((2, 3)) + eps)


@pytest.mark.parametrize("feat_size,mask_size", [((7, 9), (57, 71)), ((8, 8), (64, 64)), ((5, 5), (5, 5))])
def test_masked_average_pool_equals_upsample_then_pool(feat_size, mask_size):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 16, *feat_size, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, *mask_size, generator=g) > 0.6).double()
    torch.testing.assert_close(masked_average_pool(feat, mask), naive_map(feat, mask), rtol=1e-10, atol=1e-10)


def test_cosine_logits_scale_and_zero_prototype():
    feat = torch.randn(2, 8, 4, 5)
    protos = torch.stack([torch.zeros(2, 8), feat[:, :, 1, 2]], 1)
    out = cosine_logits(feat, protos, scale=20.0)
    assert out.shape == (2, 2, 4, 5)
    assert torch.all(out[:, 0] == 0)  # an empty mask's prototype matches nothing
    torch.testing.assert_close(out[:, 1, 1, 2], torch.full((2,), 20.0))


def tiny_panet(**kwargs):
    backbone = functools.partial(Backbone, name="resnet18", output_stride=8)
    return PANet(backbone, level=2, **kwargs)


def episode(B=2, K=1, size=33, empty_support=False):
    """Fixed regions, seed 1; the support's first row is ignored (255), even when it is empty."""
    box = [] if empty_support else [((slice(8, 20), slice(8, 20)), 1)]
    return shared_episode(
        B, K, size, seed=1, random_boxes=False,
        support=[*box, ((0, slice(None)), 255)], query=(slice(10, 25), slice(5, 15)),
    )  # fmt: skip


@pytest.mark.parametrize("K", [1, 3])
def test_forward_shapes_and_alignment_loss(K):
    model = tiny_panet().train()
    logits, aux = model(episode(K=K))
    assert logits.shape == (2, 2, 33, 33)
    assert set(aux) == {"align"} and torch.isfinite(aux["align"])
    model.eval()
    assert model(episode(K=K))[1] == {}  # PAR is a training-time loss only


def test_empty_support_mask_gives_finite_loss_and_gradients():
    model = tiny_panet().train()
    batch = episode(empty_support=True)
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["align"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_alignment_skips_episodes_predicted_empty():
    model = tiny_panet()
    B, K, C, h = 2, 1, 4, 6
    s_feat = torch.randn(B * K, C, h, h)
    q_feat = torch.randn(B, C, h, h)
    s_masks = torch.zeros(B, K, 24, 24, dtype=torch.long)
    s_masks[..., :12, :] = 1
    pred = torch.zeros(B, 2, h, h)
    pred[:, 0] = 1.0  # background wins everywhere: no predicted foreground, both skipped
    assert model.alignment_loss(q_feat, pred, s_feat, s_masks).item() == 0.0
    pred[0, 1, :3] = 2.0  # episode 0 now has a foreground prediction
    loss = model.alignment_loss(q_feat, pred, s_feat, s_masks)
    assert loss.item() > 0


def test_support_background_includes_ignore_pixels():
    model = tiny_panet()
    masks = torch.tensor([[0, 1, 255]])
    fg, bg = model._support_masks(masks)
    assert fg.tolist() == [[0.0, 1.0, 0.0]] and bg.tolist() == [[1.0, 0.0, 1.0]]
    strict = tiny_panet(bg_includes_ignore=False)
    assert strict._support_masks(masks)[1].tolist() == [[1.0, 0.0, 0.0]]


def test_segmentation_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert segmentation_loss(logits, torch.full((1, 4, 4), 255)).item() == 0.0
