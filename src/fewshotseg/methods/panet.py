"""PANet (Wang et al., ICCV 2019): prototypes by masked average pooling, cosine matching, and
prototype alignment regularisation (PAR). Follows the official code (docs/methods/panet.md), 1-way.

Per episode: foreground and background prototypes from the supports (features bilinearly upsampled
to the mask size; the foreground prototype is the mean over shots of per-shot prototypes), logits
= 20 * cosine similarity at feature resolution, upsampled to the image. PAR (training only) swaps
the roles: prototypes from the query's own predicted masks segment each support image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg.backbones import panet_vgg_keys
from fewshotseg.checkpoints import RenameTable
from fewshotseg.data.episode import IGNORE_INDEX, Episode
from fewshotseg.methods.base import Method
from fewshotseg.ops.prototypes import cosine_logits, masked_average_pool


# The authors' checkpoints: PANet's sacred snapshots (`torch.save(model.state_dict())` of a
# DataParallel `FewShotSeg`) hold only the encoder: `module.encoder.backbone.features.{2*block}.
# {2*conv}.{weight,bias}` (docs/methods/panet.md). Here the encoder is `backbone.body`: VGG-16
# with torchvision's flat `features.N` indices. Another backbone keeps its own names under
# `encoder.backbone.` (where PANet's code would hold it).
def _vgg_renames() -> tuple[tuple[str, str], ...]:
    """`encoder.backbone.features.{2b}.{2j}.` -> `backbone.body.features.N.` for the 13 convs."""
    nested = [f"features.{2 * b}.{2 * j}" for b, n in enumerate((2, 2, 3, 3, 3)) for j in range(n)]
    flat = panet_vgg_keys(dict.fromkeys(f"{k}.weight" for k in nested))  # in the same order
    return tuple(
        (f"encoder.backbone.{n}.", f"backbone.body.{f.removesuffix('weight')}") for n, f in zip(nested, flat)
    )


OFFICIAL_NAMES = RenameTable(
    "PANet", (*_vgg_renames(), ("encoder.backbone.", "backbone.body.")), unmapped="outside PANet's encoder"
)


class PANet(Method):
    official_names = OFFICIAL_NAMES

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        level: int = 4,
        dist_scale: float = 20.0,
        align: bool = True,
        bg_includes_ignore: bool = True,
    ):
        super().__init__()
        self.backbone = backbone(levels=[level])  # the paper: VGG-16 conv5_3 = level 4
        self.level, self.dist_scale, self.align = level, dist_scale, align
        # The official support background mask is "not the class", which includes 255 pixels.
        self.bg_includes_ignore = bg_includes_ignore

    def _support_masks(
        self, masks: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fg = (masks == 1).to(dtype)
        bg = (masks != 1).to(dtype) if self.bg_includes_ignore else (masks == 0).to(dtype)
        return fg, bg

    def forward(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, supports, s_masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, K = supports.shape[:2]
        size = query.shape[-2:]
        feats = self.backbone(torch.cat([supports.flatten(0, 1), query]))[self.level]  # one pass
        s_feat, q_feat = feats[: B * K], feats[B * K :]

        fg, bg = self._support_masks(s_masks.flatten(0, 1), s_feat.dtype)
        fg_proto = masked_average_pool(s_feat, fg).view(B, K, -1).mean(1)
        bg_proto = masked_average_pool(s_feat, bg).view(B, K, -1).mean(1)
        pred = cosine_logits(q_feat, torch.stack([bg_proto, fg_proto], 1), self.dist_scale)  # [B,2,h,w]
        logits = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)

        aux = {}
        if self.training and self.align:
            aux["align"] = self.alignment_loss(q_feat, pred, s_feat, s_masks)
        return logits, aux

    def alignment_loss(self, q_feat, pred, s_feat, s_masks) -> torch.Tensor:
        """PAR: query prototypes from the predicted query masks (at feature resolution, no
        upsampling, no detach) segment every support image; CE against the support labels."""
        B, K = s_masks.shape[:2]
        pred_mask = pred.argmax(1)
        q_masks = torch.stack([pred_mask == 0, pred_mask == 1], 1).to(q_feat.dtype)  # [B,2,h,w]
        q_protos = torch.einsum("bchw,bphw->bpc", q_feat, q_masks) / (q_masks.sum((2, 3))[..., None] + 1e-5)
        has_fg = q_masks[:, 1].flatten(1).any(1)  # the official code skips a way predicted empty

        s_pred = cosine_logits(s_feat, q_protos.repeat_interleave(K, 0), self.dist_scale)
        s_pred = F.interpolate(s_pred, size=s_masks.shape[-2:], mode="bilinear", align_corners=False)
        fg, bg = self._support_masks(s_masks.flatten(0, 1), s_feat.dtype)
        target = torch.full_like(s_masks.flatten(0, 1), IGNORE_INDEX)
        target[bg.bool()] = 0
        target[fg.bool()] = 1
        ce = F.cross_entropy(s_pred, target, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (target != IGNORE_INDEX).flatten(1).sum(1).clamp(min=1)
        per_support = ce.flatten(1).sum(1) / counted  # mean over pixels, as a per-call CE mean
        per_episode = per_support.view(B, K).mean(1) * has_fg
        return per_episode.mean()


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PANet's released snapshot (with or without DataParallel's `module.`) -> this module's names
    (`OFFICIAL_NAMES`); the VGG-16 convs are renumbered (`features.{2b}.{2j}` -> `features.N`). A key
    outside the encoder raises ConfigError; a missing one is caught by the strict load."""
    return OFFICIAL_NAMES.to_ours(state_dict)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_official_state`: this module's state dict -> PANet's names."""
    return OFFICIAL_NAMES.to_official(state_dict)
