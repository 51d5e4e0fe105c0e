"""PFENet's Feature Enrichment Module (FEM): the multi-scale decoder of the PFENet family.

Used by PFENet, ASGNet, QGNet, Sym-Net (meta learner) and DPNet (docs/methods/pfenet.md). Per
bin b, fine to coarse: the feature map is adaptive-average-pooled to b x b, prototype vectors are
tiled to b x b and 1-channel maps (prior, probability map, ...) bilinearly resized
(align_corners=True); the concatenation goes through `init_merge` (1x1 -> 256, ReLU), a top-down
`alpha_conv` from the previous (larger) bin, a residual `beta_conv` and an inner classifier (the
auxiliary outputs). The bins, upsampled back to the feature size, are fused by `res1`, `res2` and
classified by `cls`.

    method             feat                  vectors          maps                     in_channels
    PFENet             query 256             prototype 256    prior 1                  513
    ASGNet             cat(query, guide) 512 -                probability map 1        513
    QGNet              query 256             prototype 256    guided map, prior 2      514

Module names follow PFENet (ASGNet calls `init_merge` `corr_conv`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg.data.episode import IGNORE_INDEX


def bin_size(b: float, h: int, w: int) -> tuple[int, int]:
    """Output size of a pyramid bin on an h x w map. As in the official code, b <= 1 is relative
    (int(h * b), int(w * b): COCO's [1.0, 0.5, 0.25, 0.125] -> 81, 40, 20, 10 at 81) and b > 1 is an
    absolute b x b (PASCAL's [60, 30, 15, 8]). A relative bin never collapses below 1 x 1."""
    if b <= 1.0:
        return max(1, int(h * b)), max(1, int(w * b))
    return int(b), int(b)


def _conv1x1_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))


def _two_conv3x3(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
    )  # fmt: skip


def _classifier(dim: int, classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout), nn.Conv2d(dim, classes, 1),
    )  # fmt: skip


class FEM(nn.Module):
    """PFENet's FEM decoder.

    Args:
        in_channels: channels of cat(feat, vectors, maps) as `forward` receives them (513 for
            PFENet and ASGNet).
        bins: pyramid bins, fine to coarse (see :func:`bin_size`).
        reduce_dim: width of every bin path (256).
        classes: output classes (2: background, foreground).
        dropout: Dropout2d of the classifiers (0.1).
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[float] = (60, 30, 15, 8),
        reduce_dim: int = 256,
        classes: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.bins = tuple(float(b) if b <= 1.0 else int(b) for b in bins)
        if not self.bins:
            raise ValueError("FEM needs at least one bin")
        n = len(self.bins)
        self.init_merge = nn.ModuleList(_conv1x1_relu(in_channels, reduce_dim) for _ in range(n))
        self.alpha_conv = nn.ModuleList(_conv1x1_relu(2 * reduce_dim, reduce_dim) for _ in range(n - 1))
        self.beta_conv = nn.ModuleList(_two_conv3x3(reduce_dim) for _ in range(n))
        self.inner_cls = nn.ModuleList(_classifier(reduce_dim, classes, dropout) for _ in range(n))
        self.res1 = _conv1x1_relu(n * reduce_dim, reduce_dim)
        self.res2 = _two_conv3x3(reduce_dim)
        self.cls = _classifier(reduce_dim, classes, dropout)

    def forward(
        self, feat: torch.Tensor, vectors: torch.Tensor | None = None, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feat [B,C,h,w] (pooled per bin), vectors [B,Cv] (tiled per bin), maps [B,Cm,h,w] (resized
        per bin) -> (logits [B,classes,h,w], [inner logits [B,classes,b,b] per bin])."""
        h, w = feat.shape[-2:]
        pyramid: list[torch.Tensor] = []
        inner: list[torch.Tensor] = []
        for idx, b in enumerate(self.bins):
            size = bin_size(b, h, w)
            parts = [F.adaptive_avg_pool2d(feat, size)]
            if vectors is not None:
                parts.append(vectors[:, :, None, None].expand(-1, -1, *size))
            if maps is not None:
                parts.append(F.interpolate(maps, size=size, mode="bilinear", align_corners=True))
            x = self.init_merge[idx](torch.cat(parts, 1))
            if idx >= 1:  # top-down path from the previous bin (already at h x w, resized again)
                prev = F.interpolate(pyramid[-1], size=size, mode="bilinear", align_corners=True)
                x = self.alpha_conv[idx - 1](torch.cat([x, prev], 1)) + x
            x = self.beta_conv[idx](x) + x
            inner.append(self.inner_cls[idx](x))
            pyramid.append(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True))
        x = self.res1(torch.cat(pyramid, 1))
        x = self.res2(x) + x
        return self.cls(x), inner


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True: how the PFENet family brings logits to the input size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def inner_loss(inner: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """FEM's auxiliary loss: mean over bins of CE(upsampled inner logits, target, ignore 255).

    Pixel-mean CE like the main loss, but 0 rather than NaN when every pixel is ignored."""
    counted = (target != IGNORE_INDEX).sum().clamp(min=1)
    losses = [
        F.cross_entropy(
            upsample_logits(x, target.shape[-2:]), target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        / counted
        for x in inner
    ]
    return torch.stack(losses).mean()
