"""ASGNet (Li et al., CVPR 2021): superpixel-guided clustering (SGC) and guided prototype
allocation (GPA) on PFENet's multi-scale decoder. Follows the official code
(github.com/Reagan1311/ASGNet at cd898c5; docs/methods/asgnet.md), 1-way, K-shot.

Per episode:
1. Query and supports -> frozen backbone -> the mid levels cat(level 3, level 2) = cat(layer3,
   layer2) -> `down_conv` (1x1 -> 256, Dropout2d 0.5, no ReLU; one module for query and supports).
2. SGC (no gradient): seeds from each support mask (on the feature grid, the stride-8 grid of
   the paper backbones, up to `max_sp`), soft mask =
   (label == 1) bilinearly downsampled (align_corners=True); `n_iter` iterations of soft clustering
   inside the mask, or masked average pooling when a mask gets fewer than 2 seeds. The prototypes of
   all K shots are pooled (up to K * max_sp).
3. GPA: per query pixel, the sum of the cosine similarities to all prototypes (probability map)
   and the most similar prototype (guide feature).
4. FEM(cat(query, guide), probability map) -> logits, upsampled (bilinear, align_corners=True) to
   the input size; in training also the auxiliary loss `aux` = mean over bins of the inner CE.

Everything is batched over the batch and all shots (no Python loop over elements); only the seed
placement (scipy distance transforms on the 60x60 grid) runs per support mask on the CPU. The
official code computes the seeds in the dataset on the augmented mask; computing them here from the
same mask gives the same seeds.

Backbone passes: while the backbone's BatchNorms use batch statistics (`bn_mode: train`, the
official behaviour), the query and each shot go through the backbone in separate calls, as in the
official code, so every call normalises with (and updates the running statistics from) the same
batch as there; otherwise all supports go through in one call. The support branch runs without
gradient: the prototypes carry none (official), so nothing upstream of them could learn from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.backbones import fuse_levels
from fewshotseg.data.episode import Episode
from fewshotseg.methods.base import Method
from fewshotseg.modules.fem import FEM, inner_loss, upsample_logits
from fewshotseg.ops.superpixel import (
    batched_superpixel_clustering,
    guided_prototype_allocation,
    place_seeds_batch,
)

# The authors' checkpoints: the official `model/asgnet.py::Model` (with the FEM context module,
# `pyramid: True`, as every released config) holds the backbone as `layer0` (the PSPNet stem
# Sequential) .. `layer4`, `down_conv`, and the FEM parts at the top level with `corr_conv` for
# PFENet's `init_merge`; released files are `{'state_dict': ...}` of a DataParallel model
# (`module.` prefix). Here the FEM is `fem.*` and the backbone `backbone.body.*` with timm's names.
_FEM_OFFICIAL = {"corr_conv": "init_merge", "alpha_conv": "alpha_conv", "beta_conv": "beta_conv",
                 "inner_cls": "inner_cls", "res1": "res1", "res2": "res2", "cls": "cls"}  # fmt: skip
OFFICIAL_NAMES = checkpoints.RenameTable(
    "ASGNet",
    (
        *checkpoints.resnet_renames("backbone.body.", checkpoints.PSP_STEM),
        ("down_conv.", "down_conv."),
        *((f"{official}.", f"fem.{ours}.") for official, ours in _FEM_OFFICIAL.items()),
    ),
    drop=("layer4.",),  # built by the official model, never run by its forward (no prior)
)


class ASGNet(Method):
    """ASGNet.

    Args:
        backbone: partial of `fewshotseg.backbones.Backbone`; called with the feature levels.
        levels: concatenated (in this order) before `down_conv`; official: 3, 2 (layer3, layer2).
            Coarser maps are resized to the finest one, whose grid carries the seeds.
        reduce_dim: width of `down_conv` and of the decoder (256).
        bins: FEM pyramid bins (PASCAL: [60, 30, 15, 8]; COCO: [1.0, 0.5, 0.25, 0.125]).
        max_sp: most superpixels per support image (5).
        avg_sp_area: grid cells per superpixel when counting them (100).
        train_iter, eval_iter: clustering iterations in training (10) and evaluation (5).
        dropout: Dropout2d of `down_conv` (0.5).
    """

    official_names = OFFICIAL_NAMES

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        levels: Sequence[int] = (3, 2),
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        max_sp: int = 5,
        avg_sp_area: float = 100,
        train_iter: int = 10,
        eval_iter: int = 5,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.levels = list(levels)
        self.backbone = backbone(levels=self.levels)
        in_channels = sum(self.backbone.channels[level] for level in self.levels)
        self.down_conv = nn.Sequential(
            nn.Conv2d(in_channels, reduce_dim, 1, bias=False), nn.Dropout2d(p=dropout)
        )
        self.fem = FEM(2 * reduce_dim + 1, bins=bins, reduce_dim=reduce_dim)
        self.max_sp, self.avg_sp_area = max_sp, avg_sp_area
        self.train_iter, self.eval_iter = train_iter, eval_iter

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """cat(levels) -> down_conv: [N,3,H,W] -> [N,reduce_dim,h,w]."""
        return self.down_conv(fuse_levels(self.backbone(images), self.levels))

    @torch.no_grad()
    def prototypes(self, s_feat: torch.Tensor, s_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SGC prototypes of every support image: s_feat [N,C,h,w], s_labels [N,H,W] in {0,1,255}
        -> ([N, max_sp, C], valid [N, max_sp])."""
        h, w = s_feat.shape[-2:]
        fg = (s_labels == 1).unsqueeze(1).to(s_feat.dtype)
        mask = F.interpolate(fg, size=(h, w), mode="bilinear", align_corners=True)  # soft at the boundary
        # the feature grid; for the paper backbones exactly the official int((H-1)/8+1) stride grid
        seeds, counts = place_seeds_batch(s_labels, self.max_sp, self.avg_sp_area, grid_size=(h, w))
        n_iter = self.train_iter if self.training else self.eval_iter
        return batched_superpixel_clustering(s_feat, mask, seeds, counts, n_iter)

    def forward(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, supports, s_labels = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, K = supports.shape[:2]
        q_feat = self.features(query)
        with torch.no_grad():
            if self.backbone.uses_batch_stats:  # official: one backbone call per shot
                s_feat = torch.stack([self.features(supports[:, k]) for k in range(K)], 1).flatten(0, 1)
            else:
                s_feat = self.features(supports.flatten(0, 1))
            protos, valid = self.prototypes(s_feat, s_labels.flatten(0, 1))
        # all shots' prototypes together, shot-major as the official concatenation
        protos, valid = protos.reshape(B, -1, protos.shape[-1]), valid.reshape(B, -1)
        prob_map, guide = guided_prototype_allocation(q_feat, protos, valid)
        out, inner = self.fem(torch.cat([q_feat, guide], 1), maps=prob_map)
        logits = upsample_logits(out, query.shape[-2:])

        aux = {}
        if self.training and "query_mask" in batch:
            aux["aux"] = inner_loss(inner, batch["query_mask"])
        return logits, aux


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' ASGNet state dict (with or without `module.`) -> this module's names
    (`OFFICIAL_NAMES`), every tensor kept (the backbone's drifted BatchNorm statistics too). `layer4`
    is dropped: the official model builds it but its forward never runs it (no prior). Keys of other
    variants (the ASPP context module: `ASPP`, `skip1`, ...) raise ConfigError."""
    return OFFICIAL_NAMES.to_ours(state_dict)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_official_state` (without the `layer4` it drops)."""
    return OFFICIAL_NAMES.to_official(state_dict)
