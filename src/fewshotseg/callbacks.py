"""Callbacks of a training run.

- QualitativeOverlays: supports, query, prediction against the truth and the truth of the first
  evaluation batch, titled (class, episode IoU; drawing in overlays.py), saved as PNG in the run
  folder and sent to W&B when it is the logger.
- PerClassIoU: after testing, the IoU of every novel class as a CSV file next to each CSV logger's
  metrics.csv and, with W&B, as a `wandb.Table` with a bar chart.
- KeepProgress: `last.ckpt` at the end of every epoch, every N training steps and when SIGTERM or
  SIGINT stops the run, so a kill loses at most N steps and a stop loses nothing.
- SeedEachStep: the global RNG (dropout, random ops in methods) seeded from (seed, step) before each
  training step, so a resumed run draws what the uninterrupted one draws.
- StopOnDivergence: ends training once the loss has been NaN or infinite for N steps in a row (an
  lr too high), so a diverged run stops instead of training on NaN to its last epoch.
"""

from __future__ import annotations

import csv
import logging
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from fewshotseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fewshotseg.overlays import episode_row, stack_rows

log = logging.getLogger(__name__)


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=img.device)[:, None, None]
    return ((img * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).byte().cpu().numpy()


def episode_panel(batch: dict, pred: torch.Tensor, i: int, class_name: str = "") -> np.ndarray:
    """One titled row: each support with its mask outlined, the query, the prediction against the
    truth (TP/FP/FN), the truth outlined; headed by the episode, its class and its IoU."""
    masks = [m.cpu().numpy() for m in batch["support_masks"][i]]
    supports = [_to_rgb(s) for s in batch["support_imgs"][i]]
    episode = batch.get("episode_idx")
    number = int(episode[i]) if isinstance(episode, torch.Tensor) and int(episode[i]) >= 0 else None
    heading = (f"episode {number}  ·  " if number is not None else "") + f"class: {class_name or '?'}"
    return episode_row(supports, masks, _to_rgb(batch["query_img"][i]), pred[i].cpu().numpy(),
                       batch["query_mask"][i].cpu().numpy(), heading)  # fmt: skip


class QualitativeOverlays(Callback):
    def __init__(self, max_episodes: int = 8):
        self.max_episodes = max_episodes

    def _log(self, trainer, batch, outputs, stage: str) -> None:
        if not trainer.is_global_zero or not outputs or "pred" not in outputs:
            return
        n = min(self.max_episodes, batch["query_img"].shape[0])
        names = (
            [trainer.datamodule.class_names[int(c) - 1] for c in batch["class_id"][:n]]
            if trainer.datamodule
            else [""] * n
        )
        panels = [episode_panel(batch, outputs["pred"], i, names[i]) for i in range(n)]
        # default_root_dir (the run folder), not trainer.log_dir: that property is a collective
        # broadcast under DDP and would hang when read on rank 0 only.
        folder = Path(trainer.default_root_dir) / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stack_rows(panels)).save(folder / f"{stage}_step{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = [f"{name}: supports | query | prediction vs truth | truth" for name in names]
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


class KeepProgress(Callback):
    """`dirpath/last.ckpt`: the run's latest state, written at every epoch end (after validation),
    every `every_n_train_steps` steps (null: not mid-epoch) and when the run is stopped. (Lightning's
    own `save_last` rewrites last.ckpt only when a new best is saved, so it is not the latest state.)

    SIGTERM: Lightning stops after the current training step and raises SIGTERMException; this
    callback then writes the checkpoint. SIGINT (Ctrl-C) is turned into the same stop: the current
    step finishes, the checkpoint is written; a second Ctrl-C interrupts at once. Resuming from the
    checkpoint continues exactly where the run stopped (data order: data/train_order.py)."""

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.stop_requested = False
        self._previous_sigint = None

    def _save(self, trainer) -> None:
        # the whole state (optimiser, loops); said, or Lightning logs its default at every save
        trainer.save_checkpoint(self.path, weights_only=False)

    def _on_sigint(self, signum, frame) -> None:
        self.stop_requested = True
        signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C interrupts at once
        print("\nstopping after this training step and writing a checkpoint (Ctrl-C again to stop now)")

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous_sigint is not None and not self.stop_requested:
            signal.signal(signal.SIGINT, self._previous_sigint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_requested:
            raise SIGTERMException  # Lightning's stop: on_exception below writes the checkpoint
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not trainer.fast_dev_run:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:  # a smoke test writes no checkpoint (as Lightning's)
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer)
            if trainer.is_global_zero:
                print(f"stopped at step {trainer.global_step}; resume with ckpt_path={self.path}")


class SeedEachStep(Callback):
    """Seeds torch's global RNG from (seed, global step) before every training step."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step_seed = np.random.SeedSequence([self.seed, trainer.global_step]).generate_state(1)[0]
        torch.manual_seed(int(step_seed))


class StopOnDivergence(Callback):
    """Stops training when the training loss has been NaN or infinite for `patience` steps in a row.

    Once the loss is NaN the weights are NaN too and no later step recovers, so the rest of the
    schedule would only spend time. A few steps of patience let an isolated overflow under mixed
    precision pass. The stop is Lightning's `should_stop`: the epoch's validation still runs, and
    `train` tests the best checkpoint (from before the divergence) and says in results.json's
    `selection` at which step training stopped; a sweep goes on with its next run. Lightning honours
    the stop only once `trainer.min_epochs` (default 1) is done, so a loss that is NaN from the
    first steps ends training after the first epoch."""

    def __init__(self, patience: int = 20):
        self.patience = patience
        self.bad_steps = 0
        self.stopped_at: int | None = None  # the global step at which training was stopped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        if self.bad_steps >= self.patience and self.stopped_at is None:
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            log.warning(
                "training diverged: the loss has been %s for %d steps in a row (step %d, lr %.3g); stopping "
                "and testing the best checkpoint. A lower method.optimizer.lr usually trains.",
                loss.item(), self.bad_steps, trainer.global_step, lr,
            )  # fmt: skip


def divergence_of(trainer) -> int | None:
    """The step at which StopOnDivergence stopped this trainer's run, or None."""
    steps = [c.stopped_at for c in trainer.callbacks if isinstance(c, StopOnDivergence)]
    return next((s for s in steps if s is not None), None)
