"""FewShotSegModule: one LightningModule for every method.

loss = CE(logits, query_mask, ignore 255) + sum_k weight_k * aux_k, where the method returns its
auxiliary losses by name; in evaluation it may return `ExtraLogits` instead (methods/base.py), more
logits scored each by its own FewShotIoU. Optimiser and schedule come from the config; the learning rate written
there is the effective one (no hidden multipliers). Metrics are FewShotIoU (sum states, DDP-exact).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.data.episode import IGNORE_INDEX, Episode
from fewshotseg.errors import ConfigError
from fewshotseg.feature_cache import FeatureCache, frozen_backbones, is_deterministic, reusing
from fewshotseg.methods.base import ExtraLogits
from fewshotseg.metrics import FewShotIoU

EVAL_RESOLUTIONS = ("input", "original")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean CE ignoring 255; 0 rather than NaN when every pixel is ignored."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp(min=1)


def with_schedule(optimizer, scheduler_factory: Callable | None, module: LightningModule):
    """Lightning's optimizer config: the schedule (if any) stepped every step over the module's run."""
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer, total_steps=int(module.trainer.estimated_stepping_batches))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
        feature_reuse: Mapping | None = None,
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
        # the extra named logits a method returns in evaluation (ExtraLogits, e.g. Sym-Net's
        # meta-learner-only output): one more FewShotIoU each, made on first sight
        self.extra_iou = nn.ModuleDict()
        self.test_results: dict = {}
        self.run_iou: list[FewShotIoU] = []
        self.run_results: list[dict] = []  # one per test list of the last test (evaluate's seeds)
        self.tested_episodes = 0  # episodes the last test scored (fewer than the list under fast_dev_run)
        self.set_feature_reuse(feature_reuse)

    def set_feature_reuse(self, settings: Mapping | None = None) -> None:
        """Evaluation reuses a frozen backbone's maps of an image seen before (feature_cache.py):
        settings {enabled: true, max_gb: null (the default bound)}; the cache lives as long as the
        module (validations of a run, seeds of one `evaluate`)."""
        settings = dict(settings or {})
        unknown = set(settings) - {"enabled", "max_gb"}
        if unknown:
            raise ConfigError(f"feature_reuse: unknown key(s) {sorted(unknown)}: expected enabled, max_gb")
        enabled = bool(settings.get("enabled", True))
        self.feature_cache = FeatureCache(settings.get("max_gb")) if enabled else None
        self._reused: list = []  # the backbones served from the cache in this evaluation loop

    def _begin_reuse(self) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.begin_reuse(getattr(datamodule, "test_transform", None))

    def begin_reuse(self, test_transform) -> None:
        """Before evaluating (a loop, or `predict`'s queries): reuse where it is exact (frozen
        backbone, deterministic test transform), after dropping maps of a changed backbone state."""
        exact = self.feature_cache is not None and is_deterministic(test_transform)
        self._reused = frozen_backbones(self.method) if exact else []
        if self._reused:
            self.feature_cache.begin(self._reused)

    def feature_reuse_summary(self) -> str:
        """The line a run prints: the cache's hits, or why nothing was reused."""
        if self.feature_cache is None:
            return "feature reuse: off (feature_reuse.enabled=false)"
        if not self._reused and not self.feature_cache.hits + self.feature_cache.misses:
            return "feature reuse: off (no frozen backbone, or a random test transform)"
        return self.feature_cache.summary()

    def on_validation_epoch_start(self) -> None:
        self._begin_reuse()

    def on_test_epoch_start(self) -> None:
        self._begin_reuse()
        datamodule = getattr(self._trainer, "datamodule", None)
        runs = len(getattr(datamodule, "test_seeds", None) or [None])
        # a plain list, not submodules: the module's structure (and state_dict) stays as it is
        self.run_iou = [FewShotIoU(len(self.class_names)).to(self.device) for _ in range(runs)]

    def forward(self, batch: Episode) -> torch.Tensor:
        """Logits [B,2,H,W] at input resolution; the query label is never shown outside training."""
        if self.training:
            return self.method(batch)[0]
        visible = {k: v for k, v in batch.items() if k != "query_mask"}
        with reusing(self.feature_cache, self._reused):  # after begin_reuse (predict)
            return self.method(visible)[0]

    def training_step(self, batch: Episode, batch_idx: int) -> torch.Tensor:
        logits, aux = self.method(batch)
        # losses in fp32 under mixed precision (trainer=gpu: bf16-mixed)
        loss = seg = segmentation_loss(logits.float(), batch["query_mask"])
        bs = logits.shape[0]
        for name, value in aux.items():
            loss = loss + self.aux_weights.get(name, 1.0) * value.float()
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

    def _evaluate(self, batch: Episode, metric: FewShotIoU, stage: str = "test") -> dict[str, torch.Tensor]:
        """Score the episode. input: the argmax at network input size against the transformed label.
        original: the logits upsampled bilinearly (align_corners=True, as PFENet and HSNet do) to the
        label in `query_mask_orig`; with the PFENet test resize that label is the raw label padded
        with 255 to a max(H, W) square, which is exactly PFENet's `ori_resize` rule (docs/protocols.md),
        and with a squash resize it is the raw label (HSNet's use_original_imgsize)."""
        visible = {k: v for k, v in batch.items() if k != "query_mask"}
        with reusing(self.feature_cache, self._reused):
            logits, out = self.method(visible)
        extras = out.logits if isinstance(out, ExtraLogits) else {}
        if "test_run" not in batch:
            self._score_all(logits, extras, batch, metric, stage)
            return {"pred": logits.argmax(1)}
        # several test lists in one loop (evaluate's seeds): each episode into its list's metrics
        for run in batch["test_run"].unique().tolist():
            rows = (batch["test_run"] == run).nonzero().view(-1)
            part = {k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows.tolist()]
                    for k, v in batch.items()}  # fmt: skip
            self._score_all(logits[rows], {n: e[rows] for n, e in extras.items()}, part,
                            self.run_iou[run], f"{stage}#{run}")  # fmt: skip
        return {"pred": logits.argmax(1)}

    def _score_all(self, logits, extras: dict, batch: Episode, metric: FewShotIoU, stage: str) -> None:
        """The logits into `metric`; each extra output into its own FewShotIoU (made on first sight)."""
        for name, extra in extras.items():
            key = f"{stage}_{name}"
            if key not in self.extra_iou:
                self.extra_iou[key] = FewShotIoU(len(self.class_names)).to(logits.device)
            self._score(extra, batch, self.extra_iou[key])
        self._score(logits, batch, metric)

    def _score(self, logits: torch.Tensor, batch: Episode, metric: FewShotIoU) -> torch.Tensor:
        class_idx = batch["class_id"] - 1
        if self.resolved_eval_resolution() == "input":
            pred = logits.argmax(1)
            metric.update(pred, batch["query_mask"], class_idx)
            return pred
        for i, target in enumerate(batch["query_mask_orig"]):
            up = F.interpolate(
                logits[i : i + 1], size=tuple(target.shape), mode="bilinear", align_corners=True
            )
            metric.update(up.argmax(1), target[None].to(up.device), class_idx[i : i + 1])
        return logits.argmax(1)

    def validation_step(self, batch: Episode, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_iou, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_iou, "test")

    def on_validation_epoch_end(self) -> None:
        result = self.val_iou.compute()
        self.log_dict(
            {"val/miou": result["miou"].float(), "val/fbiou": result["fbiou"].float()}, prog_bar=True
        )
        self.val_iou.reset()
        self.log_dict(self._extra_results("val"))
        if self._reused:
            self.log("val/feature_reuse_hit_rate", self.feature_cache.hit_rate, sync_dist=True)

    def _extra_results(self, stage: str) -> dict[str, torch.Tensor]:
        """{stage}/<name>_miou and _fbiou of the extra logits, and reset their metrics."""
        out = {}
        for key, metric in self.extra_iou.items():
            if key.startswith(f"{stage}_") and metric.update_count:
                result, name = metric.compute(), key[len(stage) + 1 :]
                out[f"{stage}/{name}_miou"] = result["miou"].float()
                out[f"{stage}/{name}_fbiou"] = result["fbiou"].float()
                metric.reset()
        return out

    def on_test_epoch_end(self) -> None:
        if len(self.run_iou) > 1:  # several lists in one loop: one result each, in list order
            self.run_results = [self._test_result(m, f"test#{r}") for r, m in enumerate(self.run_iou)]
            self.test_results = self.run_results[0]
            return
        self.test_results = self._test_result(self.test_iou, "test")
        self.run_results = [self.test_results]
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items() if k != "iou_per_class"})
        self.log_dict({f"test/iou/{k}": v for k, v in self.test_results["iou_per_class"].items()})

    def _test_result(self, metric: FewShotIoU, stage: str) -> dict:
        """mIoU, FB-IoU, IoU per class and the extra outputs' scores of one test list; resets them."""
        result = metric.compute()
        self.tested_episodes = int(result["episodes"])
        per_class = {
            name: float(v) for name, v in zip(self.class_names, result["iou_per_class"].tolist()) if v == v
        }  # classes with episodes only (NaN != NaN)
        out = {"miou": float(result["miou"]), "fbiou": float(result["fbiou"]), "iou_per_class": per_class}
        out.update({k.split("/", 1)[1]: float(v) for k, v in self._extra_results(stage).items()})
        metric.reset()
        return out

    def configure_optimizers(self):
        params = [p for p in self.method.parameters() if p.requires_grad]
        if not params:  # parameter-free baselines
            return None
        return with_schedule(self.optimizer_factory(params), self.scheduler_factory, self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.stamp_run(checkpoint, self.config, self.method)
