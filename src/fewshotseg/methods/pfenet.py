"""PFENet (Tian et al., TPAMI 2020): prior-guided feature enrichment. Follows the official code
(github.com/dvlab-research/PFENet at a505675; docs/methods/pfenet.md), 1-way, K-shot.

Per episode:
1. Query and supports -> frozen backbone. Mid features = cat(level 3, level 2) (ResNet: layer3,
   layer2) -> `down_query` / `down_supp` (1x1 -> 256, ReLU, Dropout2d 0.5; separate weights).
2. Support prototype: PFENet's masked average pooling (`weighted_gap`, eps 5e-4) of the projected
   support features with the support mask resized to the features (bilinear, align_corners=True);
   mean over shots.
3. Training-free prior: support level 4 is computed from the *masked* support level 3 and masked
   again; per query position the max cosine over the support positions, min-max per image, mean
   over shots (`ops/prior.py`).
4. FEM(query, prototype, prior) (`init_merge` width 256 + 256 + 1 = 513) -> logits, upsampled
   (bilinear, align_corners=True) to the input size; in training also `aux` = the mean over bins of
   the inner CE (loss = CE + 1.0 * aux).

Backbone passes: while the backbone's BatchNorms use batch statistics (`bn_mode: train`, the
official behaviour), the query and each shot go through the backbone in separate calls as in the
official code (the same batches normalise and update the running statistics); otherwise all shots go
through in one call. Unlike ASGNet, `down_supp` learns: the support branch keeps its gradient
(only the frozen backbone runs under no-grad).

`OFFICIAL_NAMES` (the contract's `official_names`; `convert_official_state` / `to_official_state`)
maps the authors' checkpoints (`layer0`..`layer4` with the PSPNet stem, `init_merge`, ...) to this
module's names and back.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.backbones import Backbone, fuse_levels
from fewshotseg.data.episode import Episode
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import Method
from fewshotseg.modules.fem import FEM, inner_loss, upsample_logits
from fewshotseg.modules.projection import mid_projection
from fewshotseg.ops.prior import training_free_prior
from fewshotseg.ops.prototypes import weighted_gap

# The authors' checkpoints (`model/PFENet.py`): the backbone as `layer0` (the PSPNet stem
# Sequential: conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, pool) .. `layer4`, the FEM
# parts at the model's top level. Here the backbone is `backbone.body.*` with timm's deep-stem names
# (`layer1..4.*` are the same in both) and the FEM `fem.*`.
PSP_STEM = checkpoints.PSP_STEM
FEM_PARTS = ("init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
HEAD_PARTS = ("down_query", "down_supp")
HEAD_RENAMES = (*((f"{p}.", f"fem.{p}.") for p in FEM_PARTS), *((f"{p}.", f"{p}.") for p in HEAD_PARTS))
OFFICIAL_NAMES = checkpoints.RenameTable(
    "PFENet", (*checkpoints.resnet_renames("backbone.body.", PSP_STEM), *HEAD_RENAMES)
)


class PFENet(Method):
    """PFENet.

    Args:
        backbone: partial of `fewshotseg.backbones.Backbone`; called with the levels it needs.
        mid_levels: concatenated (in this order, resized to the largest) before `down_query` /
            `down_supp`; official: (3, 2) = cat(layer3, layer2).
        high_level: the level of the prior (4 = layer4); the support map of this level is computed
            from the masked previous level.
        reduce_dim: width of the projections and of the decoder (256).
        bins: FEM pyramid bins (PASCAL: [60, 30, 15, 8]; COCO: [1.0, 0.5, 0.25, 0.125]).
        dropout: Dropout2d of `down_query` / `down_supp` (0.5).
    """

    official_names = OFFICIAL_NAMES
    extra_maps = 0  # 1-channel maps a subclass adds to the FEM input besides the prior

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        mid_levels: Sequence[int] = (3, 2),
        high_level: int = 4,
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        dropout: float = 0.5,
    ):
        super().__init__()
        self.mid_levels, self.high_level = tuple(int(x) for x in mid_levels), int(high_level)
        if self.high_level - 1 not in self.mid_levels:
            raise ConfigError(
                f"PFENet: high_level={self.high_level} is computed from the masked level {self.high_level - 1}, "
                f"which must be one of mid_levels={list(self.mid_levels)}"
            )
        self.backbone = backbone(levels=sorted({*self.mid_levels, self.high_level}))
        in_channels = sum(self.backbone.channels[level] for level in self.mid_levels)
        self.down_query = mid_projection(in_channels, reduce_dim, dropout)
        self.down_supp = mid_projection(in_channels, reduce_dim, dropout)
        self.fem = FEM(2 * reduce_dim + 1 + self.extra_maps, bins=bins, reduce_dim=reduce_dim)

    # -- features -------------------------------------------------------------------------------

    def query_features(self, query: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Backbone levels of the query and its projected mid features [B, reduce_dim, h, w]."""
        feats = self.backbone(query)
        return feats, self.down_query(fuse_levels(feats, self.mid_levels))

    def support_features(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N,3,H,W], masks [N,H,W] in {0,1,255} -> (prototypes [N, reduce_dim], masked
        high-level maps [N,C,h,w]). The high level runs on the masked previous level."""
        below = self.high_level - 1
        # stop before the high level: it runs on the masked map only (and in BN train mode an
        # unmasked pass would update its statistics, which the official code never does)
        feats = self.backbone(images, levels=[lv for lv in self.backbone.levels if lv <= below])
        fg = (masks == 1).unsqueeze(1).to(feats[below].dtype)
        mask = F.interpolate(fg, size=feats[below].shape[-2:], mode="bilinear", align_corners=True)
        high = self.backbone.run_stage(feats[below] * mask, self.high_level)
        if high.shape[-2:] != mask.shape[-2:]:
            mask = F.interpolate(fg, size=high.shape[-2:], mode="bilinear", align_corners=True)
        proto = weighted_gap(self.down_supp(fuse_levels(feats, self.mid_levels)), fg)
        return proto, high * mask

    def supports(self, supports: torch.Tensor, s_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All shots: supports [B,K,3,H,W] -> (prototypes [B,K,C], masked high maps [B,K,C',h,w])."""
        B, K = supports.shape[:2]
        if self.backbone.uses_batch_stats:  # official: one backbone call per shot
            per_shot = [self.support_features(supports[:, k], s_masks[:, k]) for k in range(K)]
            return torch.stack([p for p, _ in per_shot], 1), torch.stack([h for _, h in per_shot], 1)
        protos, high = self.support_features(supports.flatten(0, 1), s_masks.flatten(0, 1))
        return protos.unflatten(0, (B, K)), high.unflatten(0, (B, K))

    def extra_query_maps(
        self, q_feats: dict[int, torch.Tensor], query: torch.Tensor, size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Further 1-channel maps [B,1,*size] for the decoder (QGNet's prior region map); none here."""
        return []

    # -- episode --------------------------------------------------------------------------------

    def forward(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, supports, s_masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        q_feats, q_mid = self.query_features(query)
        protos, s_high = self.supports(supports, s_masks)
        prior = training_free_prior(q_feats[self.high_level], s_high, q_mid.shape[-2:])
        maps = torch.cat([prior, *self.extra_query_maps(q_feats, query, q_mid.shape[-2:])], 1)
        out, inner = self.fem(q_mid, vectors=protos.mean(1), maps=maps)
        logits = upsample_logits(out, query.shape[-2:])

        aux = {}
        if self.training and "query_mask" in batch:
            aux["aux"] = inner_loss(inner, batch["query_mask"])
        return logits, aux


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def _raise_unmapped(method: str, unmapped: list[str], direction: str) -> None:
    if unmapped:
        raise ConfigError(
            f"{method} {direction}: {len(unmapped)} key(s) have no counterpart: {sorted(unmapped)[:20]}"
            + (" ..." if len(unmapped) > 20 else "")
        )


@functools.lru_cache(maxsize=8)
def official_backbone_keys(name: str, ours: str, table: checkpoints.RenameTable) -> frozenset[str]:
    """Every tensor name of backbone `name` (our names under `ours`) as the authors' model calls it,
    from a model built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        body = Backbone(name=name, levels=[4], channels_last=False).body
    return frozenset(table.to_official({f"{ours}{k}": v for k, v in body.state_dict().items()}))


def _resnet_depth_name(state: dict[str, torch.Tensor], prefix: str) -> str:
    """resnet50_psp or resnet101_psp, from the number of layer3 blocks in an official state dict."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return {6: "resnet50_psp", 23: "resnet101_psp"}.get(len(blocks), "resnet50_psp")


def official_required(
    state: dict[str, torch.Tensor], backbones: list[tuple[str, str]], table: checkpoints.RenameTable
) -> list[str]:
    """The keys an official checkpoint of this layout must have that `state` lacks: the heads and
    FEM (as many bins as it holds) and every tensor of each backbone (name, where `table` puts it)."""
    n = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"init_merge\.(\d+)\.", k))), default=-1)
    required = [f"{p}.0.weight" for p in HEAD_PARTS]
    required += [
        "res1.0.weight",
        "res2.0.weight",
        "res2.2.weight",
        "cls.0.weight",
        "cls.3.weight",
        "cls.3.bias",
    ]
    for i in range(max(n, 1)):
        required += [f"init_merge.{i}.0.weight", f"beta_conv.{i}.0.weight", f"beta_conv.{i}.2.weight"]
        required += [f"inner_cls.{i}.0.weight", f"inner_cls.{i}.3.weight", f"inner_cls.{i}.3.bias"]
    required += [f"alpha_conv.{i}.0.weight" for i in range(n - 1)]
    for name, ours in backbones:
        required += sorted(official_backbone_keys(name, ours, table))
    return [k for k in required if k not in state]


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' PFENet state dict (`model/PFENet.py`, ResNet backbone; with or without the
    DataParallel `module.` prefix) -> this module's names (`OFFICIAL_NAMES`), after checking that
    every tensor of that layout is there. Every tensor is kept, including the backbone's (drifted)
    BatchNorm statistics. Unmapped or missing keys raise ConfigError."""
    state = checkpoints.strip_prefix(state_dict)
    missing = official_required(
        state, [(_resnet_depth_name(state, "layer3"), "backbone.body.")], OFFICIAL_NAMES
    )
    _raise_unmapped("PFENet convert_official_state", missing, "(missing from the checkpoint)")
    return OFFICIAL_NAMES.to_ours(state)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_official_state`: this module's state dict -> the authors' names."""
    return OFFICIAL_NAMES.to_official(state_dict)
