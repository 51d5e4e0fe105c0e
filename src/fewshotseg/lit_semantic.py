"""SemanticSegModule: ordinary semantic segmentation for stages such as BAM's base learner
(`method=pspnet_base`, chunbolang/BAM `train_base.py`).

loss = CE(logits, label, ignore 255) (`lit.segmentation_loss`); SGD + poly per step from the
config, with the effective learning rates: `optimizer.lr` for the head and `backbone_lr` (null: the
same) for the backbone, BAM's two parameter groups. Validation and test: the argmax at the input
size against the transformed label (BAM: `resized_val`, `ori_resize: False`), accumulated by
`SemanticIoU` (sum states, DDP-exact); `val/miou` = the mean IoU over the base classes (background
excluded), which the checkpoint callback monitors.

`runs.build_run` selects this module (`build_semantic`) for a method whose contract says
`task = "semantic"` (methods/base.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hydra.utils import instantiate
from lightning import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.errors import ConfigError
from fewshotseg.lit import segmentation_loss, with_schedule
from fewshotseg.metrics import SemanticIoU


class SemanticSegModule(LightningModule):
    """Wraps a model `images [B,3,H,W] -> logits [B,C,H,W]` (C = len(class_names), 0 = background)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        class_names: list[str] | None = None,
        backbone_lr: float | None = None,
        config: dict | None = None,
    ):
        super().__init__()
        self.method = model  # same attribute as FewShotSegModule: checkpoint keys `method.*`
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.class_names = list(class_names or [])
        num_classes = getattr(model, "num_classes", len(self.class_names))
        if len(self.class_names) != num_classes:
            raise ConfigError(
                f"the model predicts {num_classes} classes but the data has {len(self.class_names)} "
                "(background + the fold's base classes)"
            )
        self.backbone_lr = backbone_lr
        self.config = config
        self.val_iou = SemanticIoU(num_classes)
        self.test_iou = SemanticIoU(num_classes)
        self.test_results: dict = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = segmentation_loss(logits, batch["label"])
        bs = logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"], prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_iou.update(self(batch["image"]).argmax(1), batch["label"])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_iou.update(self(batch["image"]).argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        result = self.val_iou.compute()
        self.log_dict(
            {"val/miou": result["miou"].float(), "val/miou_with_bg": result["miou_with_background"].float()},
            prog_bar=True,
        )
        self.val_iou.reset()

    def on_test_epoch_end(self) -> None:
        result = self.test_iou.compute()
        per_class = dict(zip(self.class_names, result["iou_per_class"].tolist(), strict=True))
        self.test_results = {
            "miou": float(result["miou"]),
            "miou_with_background": float(result["miou_with_background"]),
            "pixel_acc": float(result["pixel_acc"]),
            "iou_per_class": per_class,
        }
        self.log_dict({"test/miou": result["miou"].float(), "test/pixel_acc": result["pixel_acc"].float()})
        # per-class IoUs stay in test_results (results.json): 61 rows on COCO would drown the log
        self.test_iou.reset()
        images = len(self.trainer.datamodule.test_set) if self.trainer.datamodule is not None else "?"
        if self.trainer.is_global_zero:
            print(
                f"base-class mIoU: {100 * self.test_results['miou']:.2f} over {len(self.class_names) - 1} base "
                f"classes ({images} images; with background {100 * self.test_results['miou_with_background']:.2f})"
            )

    def configure_optimizers(self):
        backbone = getattr(self.method, "backbone", None)
        in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        trainable = [p for p in self.method.parameters() if p.requires_grad]
        body = [p for p in trainable if id(p) in in_backbone]
        head = [p for p in trainable if id(p) not in in_backbone]
        groups = [{"params": head}]
        if body:  # BAM: the encoder first, at base_lr; ppm and cls at 10x (the effective lr here)
            groups.insert(0, {"params": body, **({"lr": self.backbone_lr} if self.backbone_lr else {})})
        return with_schedule(self.optimizer_factory(groups), self.scheduler_factory, self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.stamp_run(checkpoint, self.config, self.method)


def build_semantic(cfg: DictConfig):
    """The semantic datamodule and SemanticSegModule of a run whose method is a semantic stage."""
    datamodule = instantiate(cfg.data)
    if getattr(datamodule, "task", None) != "semantic":
        raise ConfigError(f"{cfg.method.model._target_} trains on whole images: expected data.task=semantic")
    method_cfg = cfg.method
    names = datamodule.class_names
    module = SemanticSegModule(
        model=instantiate(method_cfg.model, num_classes=datamodule.num_base_classes + 1),
        optimizer=instantiate(method_cfg.optimizer),
        scheduler=instantiate(method_cfg.scheduler) if method_cfg.get("scheduler") else None,
        class_names=["background", *(names[c - 1] for c in datamodule.base)],
        backbone_lr=method_cfg.get("backbone_lr"),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return datamodule, module
