"""FewShotSegModule: one LightningModule for every method.

loss = CE(logits, query_mask, ignore 255) + sum_k weight_k * aux_k, where the method returns its
auxiliary losses by name. Optimiser and schedule come from the config; the learning rate written
there is the effective one (no hidden multipliers). Metrics are FewShotIoU (sum states, DDP-exact).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from fewshotseg.data.episode import IGNORE_INDEX, Episode
from fewshotseg.errors import ConfigError
from fewshotseg.metrics import FewShotIoU

EVAL_RESOLUTIONS = ("input", "original")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean CE ignoring 255; 0 rather than NaN when every pixel is ignored."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp(min=1)


class FewShotSegModule(LightningModule):
    def __init__(
        self,
        method: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        aux_weights: dict[str, float] | None = None,
        class_names: list[str] | None = None,
        eval_resolution: str | None = "input",
        config: dict | None = None,
    ):
        super().__init__()
        if eval_resolution not in (None, *EVAL_RESOLUTIONS):
            raise ConfigError(
                f"eval_resolution={eval_resolution!r}: expected 'input', 'original' or null (the data protocol's)"
            )
        self.method = method
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.aux_weights = dict(aux_weights or {})
        self.class_names = list(class_names or [])
        self.eval_resolution = eval_resolution
        self.config = config  # the run's resolved config, stored in checkpoints for `evaluate`
        self.val_iou = FewShotIoU(len(self.class_names))
        self.test_iou = FewShotIoU(len(self.class_names))
        self.test_results: dict = {}

    def forward(self, batch: Episode) -> torch.Tensor:
        """Logits [B,2,H,W] at input resolution; the query label is never shown outside training."""
        visible = batch if self.training else {k: v for k, v in batch.items() if k != "query_mask"}
        return self.method(visible)[0]

    def training_step(self, batch: Episode, batch_idx: int) -> torch.Tensor:
        logits, aux = self.method(batch)
        loss = seg = segmentation_loss(logits, batch["query_mask"])
        bs = logits.shape[0]
        for name, value in aux.items():
            loss = loss + self.aux_weights.get(name, 1.0) * value
            self.log(f"train/{name}", value, batch_size=bs, sync_dist=True)
        self.log("train/ce", seg, batch_size=bs, sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return loss

    def resolved_eval_resolution(self) -> str:
        """eval_resolution, or (null) the one the datamodule's protocol names (pfenet: original)."""
        if self.eval_resolution is not None:
            return self.eval_resolution
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "eval_resolution", None) or "input"

    def _evaluate(self, batch: Episode, metric: FewShotIoU) -> dict[str, torch.Tensor]:
        """Score the episode. input: the argmax at network input size against the transformed label.
        original: the logits upsampled bilinearly (align_corners=True, as PFENet and HSNet do) to the
        label in `query_mask_orig`; with the PFENet test resize that label is the raw label padded
        with 255 to a max(H, W) square, which is exactly PFENet's `ori_resize` rule (protocol.md 3.2),
        and with a squash resize it is the raw label (HSNet's use_original_imgsize)."""
        logits = self(batch)
        class_idx = batch["class_id"] - 1
        if self.resolved_eval_resolution() == "input":
            pred = logits.argmax(1)
            metric.update(pred, batch["query_mask"], class_idx)
            return {"pred": pred}
        for i, target in enumerate(batch["query_mask_orig"]):
            up = F.interpolate(
                logits[i : i + 1], size=tuple(target.shape), mode="bilinear", align_corners=True
            )
            metric.update(up.argmax(1), target[None].to(up.device), class_idx[i : i + 1])
        return {"pred": logits.argmax(1)}

    def validation_step(self, batch: Episode, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_iou)

    def test_step(self, batch: Episode, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_iou)

    def on_validation_epoch_end(self) -> None:
        result = self.val_iou.compute()
        self.log_dict(
            {"val/miou": result["miou"].float(), "val/fbiou": result["fbiou"].float()}, prog_bar=True
        )
        self.val_iou.reset()

    def on_test_epoch_end(self) -> None:
        result = self.test_iou.compute()
        per_class = {
            name: float(v) for name, v in zip(self.class_names, result["iou_per_class"].tolist()) if v == v
        }  # classes with episodes only (NaN != NaN)
        self.test_results = {
            "miou": float(result["miou"]),
            "fbiou": float(result["fbiou"]),
            "iou_per_class": per_class,
        }
        self.log_dict({"test/miou": result["miou"].float(), "test/fbiou": result["fbiou"].float()})
        self.log_dict({f"test/iou/{k}": v for k, v in per_class.items()})
        self.test_iou.reset()

    def configure_optimizers(self):
        params = [p for p in self.method.parameters() if p.requires_grad]
        if not params:  # parameter-free baselines
            return None
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint["fewshotseg_config"] = self.config
