"""Helpers shared by the entry points: building objects from a config, user-facing errors, W&B mode."""

from __future__ import annotations

import contextlib
import netrc
import os
import sys
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from fewshotseg.errors import UserInputError
from fewshotseg.lit import FewShotSegModule

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _user_error(exc: BaseException) -> UserInputError | None:
    """The UserInputError behind `exc` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def user_errors():
    """Bad input ends the program with one clear line (exit code 2), not a traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's input
        err = _user_error(e)
        if err is None:
            raise
        print(f"fewshotseg: error: {err}", file=sys.stderr)
        sys.exit(2)


def build(cfg: DictConfig):
    """The datamodule and the LightningModule a run config describes."""
    datamodule = instantiate(cfg.data)
    method_cfg = cfg.method
    module = FewShotSegModule(
        method=instantiate(method_cfg.model),
        optimizer=instantiate(method_cfg.optimizer),
        scheduler=instantiate(method_cfg.scheduler) if method_cfg.get("scheduler") else None,
        aux_weights=dict(method_cfg.get("aux_weights") or {}),
        class_names=datamodule.class_names,
        eval_resolution=cfg.get("eval_resolution", "input"),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return datamodule, module


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
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent
            offline = os.environ.get("WANDB_MODE") == "offline"
            logger.experiment.finish()
            if offline:
                print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")


def instantiate_group(group: DictConfig | None) -> list:
    return [instantiate(v) for v in (group or {}).values() if v is not None and "_target_" in v]
