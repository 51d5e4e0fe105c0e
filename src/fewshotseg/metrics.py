"""FewShotIoU: the field's class mIoU and FB-IoU, accumulated over episodes (protocol.md §2).

mIoU: for each class, the intersection and the union of the foreground are summed over all of that
class's episodes; IoU_c = sum I / sum U; mIoU = mean over the classes that had episodes.
FB-IoU: background and foreground intersections and unions summed over all episodes; the mean of
the two IoUs. Pixels whose target is 255 are ignored. Never a mean of per-episode IoUs.

Every state is a sum, so the result under DDP equals the one-process result exactly.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class FewShotIoU(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731 - exact integer counts
        self.add_state("intersection", zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("union", zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("episodes", zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("fb_intersection", zeros(2), dist_reduce_fx="sum")
        self.add_state("fb_union", zeros(2), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_idx: torch.Tensor) -> None:
        """pred [B,H,W] in {0,1}; target [B,H,W] in {0,1,ignore}; class_idx [B] in [0, num_classes)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
            )
        class_idx = class_idx.long().view(-1)
        if (
            class_idx.numel() != pred.shape[0]
            or (class_idx < 0).any()
            or (class_idx >= self.num_classes).any()
        ):
            raise ValueError(
                f"class_idx must hold one value in [0, {self.num_classes}) per episode, got {class_idx.tolist()}"
            )
        valid = target != self.ignore_index
        pred_fg, true_fg = (pred == 1) & valid, (target == 1) & valid
        pred_bg, true_bg = (pred != 1) & valid, (target == 0) & valid
        inter_fg = (pred_fg & true_fg).flatten(1).sum(1)
        union_fg = (pred_fg | true_fg).flatten(1).sum(1)
        self.intersection.index_add_(0, class_idx, inter_fg)
        self.union.index_add_(0, class_idx, union_fg)
        self.episodes.index_add_(0, class_idx, torch.ones_like(class_idx))
        self.fb_intersection += torch.stack([(pred_bg & true_bg).sum(), inter_fg.sum()])
        self.fb_union += torch.stack([(pred_bg | true_bg).sum(), union_fg.sum()])

    def compute(self) -> dict[str, torch.Tensor]:
        seen = self.episodes > 0
        iou = self.intersection.double() / self.union.double().clamp(min=1)
        iou_per_class = torch.where(seen, iou, torch.full_like(iou, float("nan")))
        fb = self.fb_intersection.double() / self.fb_union.double().clamp(min=1)
        return {
            "miou": iou[seen].mean() if seen.any() else torch.tensor(float("nan"), dtype=torch.double),
            "fbiou": fb.mean(),
            "iou_per_class": iou_per_class,
        }
