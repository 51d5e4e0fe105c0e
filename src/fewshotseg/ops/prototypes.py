"""Prototype ops shared by the methods: masked average pooling and cosine matching."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _linear_interp_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """A [out, in] with A @ x == F.interpolate(x, out_size, mode='linear', align_corners=False)."""
    eye = torch.eye(in_size, dtype=torch.float64)[None]  # [1, in(channels), in(length)]
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T.contiguous()


def upsampled_mask_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pull a full-resolution mask [N,H,W] back to feature resolution `size` through the adjoint of
    bilinear upsampling (align_corners=False), so that

        sum_HW upsample(f) * m == sum_hw f * upsampled_mask_weights(m)

    exactly: masked pooling of upsampled features without materialising them (PANet upsamples a
    53x53x512 map to 417x417 for every support image; this is the same sum at 1/60 of the memory).
    """
    (h, w), (H, W) = size, mask.shape[-2:]
    a_h = _linear_interp_matrix(H, h).to(mask)  # [H, h]
    a_w = _linear_interp_matrix(W, w).to(mask)  # [W, w]
    return a_h.T @ mask @ a_w


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Masked average pooling: sum(f * m) / (sum(m) + eps) -> [N, C].

    feat [N,C,h,w]; mask [N,H,W] float. If the mask is larger than the features, the features are
    (implicitly) bilinearly upsampled to the mask size first, as PANet does.
    """
    if mask.shape[-2:] != feat.shape[-2:]:
        weights = upsampled_mask_weights(mask, tuple(feat.shape[-2:]))
    else:
        weights = mask
    return torch.einsum("nchw,nhw->nc", feat, weights) / (mask.sum((-2, -1))[:, None] + eps)


def cosine_logits(
    feat: torch.Tensor, protos: torch.Tensor, scale: float = 20.0, eps: float = 1e-8
) -> torch.Tensor:
    """scale * cos(feat(x), p) for every prototype: feat [N,C,h,w], protos [N,P,C] -> [N,P,h,w].

    A zero prototype (empty mask) gives 0 everywhere."""
    return scale * F.cosine_similarity(feat[:, None], protos[..., None, None], dim=2, eps=eps)


def weighted_gap(feat: torch.Tensor, mask: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """PFENet-family masked average pooling (`Weighted_GAP`): sum(f * m) / (sum(m) + eps) -> [N, C].

    feat [N,C,h,w]; mask [N,1,H,W] or [N,H,W] float in [0, 1]. A mask of another size is first
    resized to the features (bilinear, align_corners=True, so soft at object boundaries), as the
    PFENet code does before pooling. An empty mask gives a zero prototype."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.shape[-2:] != feat.shape[-2:]:
        mask = F.interpolate(mask, size=feat.shape[-2:], mode="bilinear", align_corners=True)
    return (feat * mask).sum((-2, -1)) / (mask.sum((-2, -1)) + eps)
