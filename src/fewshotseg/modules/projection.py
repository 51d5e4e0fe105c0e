"""PFENet's projection of the mid-level features (docs/methods/pfenet.md)."""

from __future__ import annotations

from torch import nn


def mid_projection(in_ch: int, reduce_dim: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """1x1 conv (no bias) -> ReLU -> Dropout2d: PFENet's `down_query` / `down_supp` (and QGNet's,
    Sym-Net's). Indices 0 (conv), 1 (ReLU), 2 (dropout) match the official `nn.Sequential`, so the
    authors' `down_query.0.weight` loads by name."""
    return nn.Sequential(
        nn.Conv2d(in_ch, reduce_dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout)
    )
