"""FewShotIoU: the field's class mIoU and FB-IoU, accumulated over episodes (docs/protocols.md).

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
            "episodes": self.episodes.sum(),  # summed over ranks, as every state
        }


class SemanticIoU(Metric):
    """Multi-class IoU of ordinary semantic segmentation (BAM's base-learner stage, `train_base.py`):
    per class, intersection and union summed over every pixel of every image; the reported mIoU is
    the mean over classes 1..num_classes-1 (the base classes, background excluded), a class with an
    empty union counting 0 as in BAM (`I / (U + 1e-10)`). Sum states: DDP gives the one-process value.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731 - exact integer counts
        self.add_state("intersection", zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("union", zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("target", zeros(num_classes), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred [B,H,W] in [0, num_classes); target [B,H,W] in [0, num_classes) or ignore_index."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
            )
        valid = target != self.ignore_index
        if (target[valid] >= self.num_classes).any() or (target[valid] < 0).any():
            raise ValueError(f"target has values outside 0..{self.num_classes - 1} and {self.ignore_index}")
        p, t = pred[valid].long(), target[valid].long()
        n = self.num_classes
        area_pred = torch.bincount(p, minlength=n)[:n]
        area_target = torch.bincount(t, minlength=n)
        inter = torch.bincount(t[p == t], minlength=n)
        self.intersection += inter
        self.union += area_pred + area_target - inter
        self.target += area_target

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.intersection.double() / self.union.double().clamp(min=1)  # 0 where U = 0, as BAM
        return {
            "miou": iou[1:].mean(),
            "miou_with_background": iou.mean(),
            "iou_per_class": iou,
            "pixel_acc": self.intersection.sum().double() / self.target.sum().double().clamp(min=1),
        }
