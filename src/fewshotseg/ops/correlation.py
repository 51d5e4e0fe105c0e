"""HSNet-style hyper-correlation reduced to one map per layer (Sym-Net's TDC input, docs/methods/symnet.md).

For a query map q and a support map s of one layer: per query position i,

    corr(i) = mean over support foreground positions j of ReLU(cos(q_i, s_j))

with cos = <q_i / (|q_i| + eps), s_j / (|s_j| + eps)> (eps 1e-5, added to the norm as the official
`Correlation.multilayer_correlation`). The foreground is where the support mask, bilinearly resized
(align_corners=True) to the layer's size, is exactly 1 (boundary pixels with a soft value are left
out, as in the official `mask_feature`). No foreground pixel gives 0 (the official code correlates
with one zero vector). Per episode, only the foreground columns of the support are correlated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CORR_EPS = 1e-5


def foreground_positions(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,1,H,W] float mask -> [B, h*w] float, 1 where the resized mask is exactly 1."""
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=True)
    return (mask.flatten(1) == 1).to(mask.dtype)


def masked_correlation(
    query: torch.Tensor, support: torch.Tensor, fg: torch.Tensor, eps: float = CORR_EPS
) -> torch.Tensor:
    """query, support [B,C,h,w] (same size), fg [B, h*w] in {0, 1} -> [B,1,h,w].

    Only the support's foreground columns are correlated (the mean is over them): the same sum as
    weighting all h*w columns by 0/1, in a fraction of the work (at 473 px and output stride 8 a
    layer's full map is 3600 x 3600 cosines per episode)."""
    B, C, h, w = query.shape
    q = query.reshape(B, C, h * w)
    s = support.reshape(B, C, -1)
    q = q / (torch.linalg.vector_norm(q, dim=1, keepdim=True) + eps)
    s = s / (torch.linalg.vector_norm(s, dim=1, keepdim=True) + eps)
    out = q.new_zeros(B, h * w)
    for b in range(B):
        cols = fg[b].nonzero().squeeze(1)
        if len(cols):  # no foreground: 0
            corr = (q[b].transpose(0, 1) @ s[b][:, cols]).clamp_(min=0)  # [hw(q), |fg|]
            out[b] = corr.sum(1) / len(cols)
    return out.view(B, 1, h, w)


def hyper_correlation(
    query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """One correlation map per layer, stacked: lists of [B,C_l,h,w] maps and the support mask
    [B,1,H,W] (float, 1 = foreground) -> [B, len(layers), h, w]. Layers of one stage share a size,
    so the resized foreground is computed once per size."""
    fgs: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for q, s in zip(query_feats, support_feats, strict=True):
        size = tuple(s.shape[-2:])
        if size not in fgs:
            fgs[size] = foreground_positions(mask.to(s.dtype), size)
        out.append(masked_correlation(q, s, fgs[size]))
    return torch.cat(out, 1)
