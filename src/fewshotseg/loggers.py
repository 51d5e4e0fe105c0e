"""Logging of a run: Lightning's messages into the run folder's log file, and W&B without an account
(offline unless logged in or WANDB_MODE is set; a finished run says how to upload it)."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig


def log_lightning_to_run_folder() -> None:
    """Lightning's loggers through the root logger that Hydra set up (console and `<task>.log` in the
    run folder). Lightning gives them their own console handler and stops propagation when it is
    imported before logging is configured, so otherwise the run folder's log file stays empty."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def prepare_wandb(cfg: DictConfig) -> None:
    """W&B works without an account: offline unless logged in or WANDB_MODE is set."""
    uses_wandb = any("WandbLogger" in str(v.get("_target_", "")) for v in (cfg.get("logger") or {}).values())
    if uses_wandb and "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


def finish_wandb(loggers) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent
            offline = os.environ.get("WANDB_MODE") == "offline"
            logger.experiment.finish()
            if offline:
                print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")
