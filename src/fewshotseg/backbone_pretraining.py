"""Backbone pre-training on the synthetic corpus (`python -m fewshotseg.pretrain_backbone`).

The model is the backbone with one 1x1 classifier per attribute (shape, texture, colour; each with a
background class) on its deepest level, upsampled to the image: dense attribute segmentation, so
the features of every cell must say what is there. Only the backbone is kept: `export_backbone`
writes its tensors under their timm names, the file `backbone.weights=` loads as it is.

Validation accuracy is per pixel on the held-out corpus images: `category_acc` counts an object
pixel right when all three attributes are (one of 1200 categories), `background_acc` is the share
of background pixels called background.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.data.pretraining_corpus import ATTRIBUTES, NUM_VALUES
from fewshotseg.lit import segmentation_loss, with_schedule

IGNORE = 255


class AttributeSegmenter(nn.Module):
    """backbone(levels=[4]) -> {attribute: logits [B, values + 1, H, W]} at the input size."""

    def __init__(self, backbone: Callable[..., nn.Module], level: int = 4):
        super().__init__()
        self.backbone, self.level = backbone(levels=[level]), level
        width = self.backbone.channels[level]
        self.heads = nn.ModuleDict({a: nn.Conv2d(width, NUM_VALUES[a] + 1, 1) for a in ATTRIBUTES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)[self.level]
        size = images.shape[-2:]
        return {
            a: F.interpolate(head(features), size, mode="bilinear", align_corners=False)
            for a, head in self.heads.items()
        }


class BackbonePretraining(LightningModule):
    """loss = sum over the attributes of the pixel-mean CE (ignore 255); SGD + a per-step schedule."""

    def __init__(self, model: AttributeSegmenter, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.method = model  # checkpoint keys `method.backbone.body.*`, as the other stages'
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.register_buffer("counts", torch.zeros(len(ATTRIBUTES) + 4, dtype=torch.long), persistent=False)
        self.val_results: dict[str, float] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.method(batch["image"])
        losses = {a: segmentation_loss(logits[a], batch["label"][:, i]) for i, a in enumerate(ATTRIBUTES)}
        loss = sum(losses.values())
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/loss_{a}": v for a, v in losses.items()}, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.method(batch["image"])
        label = batch["label"]  # [B, 3, H, W]
        right = torch.stack([logits[a].argmax(1) == label[:, i] for i, a in enumerate(ATTRIBUTES)], 1)
        valid = label[:, 0] != IGNORE
        objects, background = valid & (label[:, 0] > 0), valid & (label[:, 0] == 0)
        per_attribute = [(right[:, i] & objects).sum() for i in range(len(ATTRIBUTES))]
        self.counts += torch.stack([*per_attribute, (right.all(1) & objects).sum(), objects.sum(),
                                    (right.all(1) & background).sum(), background.sum()])  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        c = self.counts.double()
        if self.trainer.world_size > 1:
            c = self.trainer.strategy.reduce(c, reduce_op="sum")
        n = len(ATTRIBUTES)
        objects = c[n + 1].clamp(min=1)
        self.val_results = {
            "category_acc": float(c[n] / objects),
            "background_acc": float(c[n + 2] / c[n + 3].clamp(min=1)),
            **{f"{a}_acc": float(c[i] / objects) for i, a in enumerate(ATTRIBUTES)},
        }
        self.log_dict({f"val/{k}": v for k, v in self.val_results.items()}, prog_bar=True)
        self.counts.zero_()

    def configure_optimizers(self):
        params = [p for p in self.method.parameters() if p.requires_grad]
        return with_schedule(self.optimizer_factory(params), self.scheduler_factory, self)


def export_backbone(model: AttributeSegmenter, path: Path, meta: dict) -> dict:
    """The backbone's tensors (timm names, contiguous, float32) to `path`, and `meta` with the file's
    digest beside it as `<path>.json` (returned); each written to a temporary file first and renamed,
    so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.backbone.body.state_dict().items()}
    # the digest results.json records for a run on this file: made again on another kind of machine,
    # the file holds other tensors (docs/pretraining.md), so it is named by what it holds
    meta = {**meta, "sha256": checkpoints.state_digest(state), "made_on": machine()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    tmp_meta = tmp.with_suffix(".json")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_meta, metadata_path(path))
    return meta


def machine() -> dict:
    """What made a file: torch's version and the CPU (or GPU), since both change its tensors."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cpu": cpu, "gpu": gpu}


def metadata_path(weights: Path) -> Path:
    return weights.with_name(weights.name + ".json")


def read_metadata(weights: Path) -> dict | None:
    try:
        return json.loads(metadata_path(weights).read_text())
    except (OSError, ValueError):
        return None
