"""PFENet's training-free prior (docs/methods/pfenet.md), shared by PFENet and QGNet (its
cross-correspondence map; QGNet's self-correspondence map is the same computation between two
query maps).

For each query position i: c(i) = max_j cos(q_i, s_j) over the support positions j, then min-max
normalised per image to [0, 1]. The support map is masked by the caller (PFENet: layer4 of the
masked layer3, masked again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-7


def max_cosine_map(
    query: torch.Tensor, key: torch.Tensor, eps: float = COSINE_EPS, minmax: bool = True
) -> torch.Tensor:
    """min-max(max_j cos(query_i, key_j)): query [B,C,h,w], key [B,C,h',w'] -> [B,1,h,w] in [0, 1].

    As the official code: cosine = <q, k> / (|q| |k| + eps) as one bmm (so an all-zero key, e.g. a
    masked-out support, gives 0 instead of NaN), max over the key positions, then
    (c - min) / (max - min + eps) per image (a constant map gives 0, not a division by zero).
    `minmax=False` returns the max cosine itself."""
    B, C, h, w = query.shape
    q = query.reshape(B, C, h * w)  # reshape: the backbone may return channels_last maps
    k = key.reshape(B, C, -1).transpose(1, 2)  # [B, h'w', C]
    q_norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)  # [B, 1, hw]
    k_norm = torch.linalg.vector_norm(k, dim=2, keepdim=True)  # [B, h'w', 1]
    sim = torch.bmm(k, q) / (torch.bmm(k_norm, q_norm) + eps)  # [B, h'w', hw]
    c = sim.max(1)[0]  # [B, hw]
    if not minmax:
        return c.view(B, 1, h, w)
    lo, hi = c.min(1, keepdim=True)[0], c.max(1, keepdim=True)[0]
    return ((c - lo) / (hi - lo + eps)).view(B, 1, h, w)


def training_free_prior(
    q_high: torch.Tensor, s_high: torch.Tensor, size: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """PFENet's prior mask: q_high [B,C,h,w] (query layer4), s_high [B,K,C,h',w'] or [B,C,h',w']
    (masked support layer4, one map per shot) -> [B,1,*size] in [0, 1].

    Per shot the max-cosine map (:func:`max_cosine_map`) is resized to `size` (bilinear,
    align_corners=True), then the shots are averaged. An empty support mask gives a zero map for
    that shot (no NaN)."""
    if s_high.dim() == 4:
        s_high = s_high[:, None]
    # one shot at a time: the [B, h'w', hw] similarity is the largest tensor (50 MB per image at 60x60)
    maps = [
        F.interpolate(
            max_cosine_map(q_high, s_high[:, k]), size=tuple(size), mode="bilinear", align_corners=True
        )
        for k in range(s_high.shape[1])
    ]
    return torch.stack(maps, 1).mean(1)
