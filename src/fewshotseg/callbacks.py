"""Callbacks of a training run.

- QualitativeOverlays: support, query, prediction and ground truth of the first evaluation batch,
  saved as PNG in the run folder and sent to W&B when it is the logger.
- PerClassIoU: after testing, the IoU of every novel class as a CSV file next to each CSV logger's
  metrics.csv and, with W&B, as a `wandb.Table` with a bar chart.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from fewshotseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_FG = np.array([255, 60, 60], dtype=np.float32)


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=img.device)[:, None, None]
    return ((img * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).byte().cpu().numpy()


def overlay(rgb: np.ndarray, mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """The image with the object (1) tinted red and ignored pixels (255) tinted white."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    out = rgb.astype(np.float32)
    out[m == 1] = 0.5 * out[m == 1] + 0.5 * _FG
    out[m == 255] = 0.5 * out[m == 255] + 0.5 * 255  # ignore band in white
    return out.astype(np.uint8)


def episode_panel(batch: dict, pred: torch.Tensor, i: int) -> np.ndarray:
    """One row: each support with its mask, the query with the prediction, the query with the truth."""
    tiles = [overlay(_to_rgb(s), m) for s, m in zip(batch["support_imgs"][i], batch["support_masks"][i])]
    query = _to_rgb(batch["query_img"][i])
    tiles += [overlay(query, pred[i]), overlay(query, batch["query_mask"][i])]
    return np.concatenate(tiles, axis=1)


class QualitativeOverlays(Callback):
    def __init__(self, max_episodes: int = 8):
        self.max_episodes = max_episodes

    def _log(self, trainer, batch, outputs, stage: str) -> None:
        if not trainer.is_global_zero or not outputs or "pred" not in outputs:
            return
        n = min(self.max_episodes, batch["query_img"].shape[0])
        panels = [episode_panel(batch, outputs["pred"], i) for i in range(n)]
        names = (
            [trainer.datamodule.class_names[int(c) - 1] for c in batch["class_id"][:n]]
            if trainer.datamodule
            else [""] * n
        )
        # default_root_dir (the run folder), not trainer.log_dir: that property is a collective
        # broadcast under DDP and would hang when read on rank 0 only.
        folder = Path(trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(panels, axis=0)).save(
            folder / f"{stage}_step{trainer.global_step:06d}.png"
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = [f"{name}: supports | prediction | ground truth" for name in names]
                logger.log_image(key=f"{stage}/overlays", images=panels, caption=caption)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, batch, outputs, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._log(trainer, batch, outputs, "test")


class PerClassIoU(Callback):
    """The test IoU of each class (`pl_module.test_results`, computed in `on_test_epoch_end`):
    `test_iou_per_class.csv` next to every CSV logger's metrics.csv (the run folder without one),
    and with W&B a `test/iou_per_class` table and bar chart. Only rank 0 writes."""

    def on_test_end(self, trainer, pl_module) -> None:
        results = getattr(pl_module, "test_results", None) or {}
        per_class = results.get("iou_per_class") or {}
        if not trainer.is_global_zero or not per_class:
            return
        rows = [(name, float(iou)) for name, iou in per_class.items()]
        folders = [Path(lg.log_dir) for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        for folder in folders or [Path(trainer.default_root_dir)]:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "test_iou_per_class.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["class", "iou"])
                writer.writerows(rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(columns=["class", "iou"], data=[list(r) for r in rows])
                chart = wandb.plot.bar(table, "class", "iou", title="test IoU per class")
                logger.experiment.log({"test/iou_per_class": table, "test/iou_per_class_chart": chart})
