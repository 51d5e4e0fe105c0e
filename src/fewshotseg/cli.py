"""Helpers shared by the entry points: building objects from a config, user-facing errors, W&B mode,
the authors' released checkpoints and the results.json every run writes.

torch and Lightning are imported where they are used, so that light tools (`report`) start fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import netrc
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshotseg.errors import ConfigError, UserInputError

if TYPE_CHECKING:
    import torch

    from fewshotseg.lit import FewShotSegModule

# The Hydra configs ship inside the package, so an installed wheel finds them as a source checkout does.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


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


# Config groups whose choice names a run (stored in checkpoints and results.json).
_NAMED_GROUPS = ("method", "data", "backbone", "protocol", "experiment")


def _hydra_choices() -> dict:
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {g: choices.get(g) for g in _NAMED_GROUPS if choices.get(g) is not None}


def build(cfg: DictConfig):
    """The datamodule and the LightningModule a run config describes."""
    from fewshotseg.lit import FewShotSegModule

    datamodule = instantiate(cfg.data)
    method_cfg = cfg.method
    config = OmegaConf.to_container(cfg, resolve=True)
    config.setdefault("choices", _hydra_choices())  # which method/data/backbone, for reports
    module = FewShotSegModule(
        method=instantiate(method_cfg.model),
        optimizer=instantiate(method_cfg.optimizer),
        scheduler=instantiate(method_cfg.scheduler) if method_cfg.get("scheduler") else None,
        aux_weights=dict(method_cfg.get("aux_weights") or {}),
        class_names=datamodule.class_names,
        eval_resolution=cfg.get("eval_resolution", "input"),
        config=config,
    )
    return datamodule, module


def is_semantic(cfg: DictConfig) -> bool:
    """A stage such as method=pspnet_base: semantic segmentation of whole images, not episodes."""
    return OmegaConf.select(cfg, "method.task") == "semantic"


def build_run(cfg: DictConfig):
    """build(), or for a semantic stage `lit_semantic.build_semantic()`."""
    if is_semantic(cfg):
        from fewshotseg.lit_semantic import build_semantic

        return build_semantic(cfg)
    return build(cfg)


# ------------------------------------------------------------------------------------------------
# The authors' released checkpoints
# ------------------------------------------------------------------------------------------------


def method_module(cfg: DictConfig):
    """The Python module of the configured method (`method.model._target_`'s module)."""
    target = str(OmegaConf.select(cfg, "method.model._target_") or "")
    return importlib.import_module(target.rpartition(".")[0])


def official_converter(cfg: DictConfig) -> Callable[[dict], dict]:
    """The method module's `convert_official_state` (authors' names -> ours)."""
    module = method_module(cfg)
    convert = getattr(module, "convert_official_state", None)
    if convert is None:
        raise ConfigError(
            f"method {module.__name__.rpartition('.')[2]!r} has no convert_official_state: "
            "there is no released checkpoint format to load (use ckpt=<a fewshotseg checkpoint>)"
        )
    return convert


def read_state_file(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.tar (weights only, never unpickled code) or .safetensors file;
    unwraps the usual {'state_dict': ...} / {'model': ...} checkpoint wrappers (checkpoints.py)."""
    from fewshotseg import checkpoints

    return checkpoints.unwrap_checked(checkpoints.read(path, key), path, key)


def load_official_weights(module: FewShotSegModule, cfg: DictConfig, path: str | Path) -> None:
    """Map the authors' checkpoint onto the method (convert_official_state) and load every tensor:
    a tensor the checkpoint lacks, one it has in excess or one of another shape is a ConfigError."""
    state = official_converter(cfg)(read_state_file(path))
    from fewshotseg.checkpoints import mismatch

    own = module.method.state_dict()
    missing, unexpected, wrong = mismatch(own, state, ignore_bn_counts=False)
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in wrong]
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has other shapes of", shapes)):
        if keys:
            more = f" ... ({len(keys)} in all)" if len(keys) > 8 else ""
            raise ConfigError(
                f"weights={path} {what} tensors for this model ({cfg.method.model._target_}): "
                f"{', '.join(keys[:8])}{more}; check method=, backbone= and shot= against the release"
            )
    module.method.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------
# results.json (written by train and evaluate, read by report)
# ------------------------------------------------------------------------------------------------


def run_info(cfg: DictConfig) -> dict:
    """What names a run in a report: method, backbone, data, fold, shot, seed, protocol."""
    choices = dict(cfg.get("choices") or {})  # stored by build(); older checkpoints: the class names
    target = str(OmegaConf.select(cfg, "method.model._target_") or "")
    source = str(OmegaConf.select(cfg, "data.source._target_") or "")
    return {
        "method": choices.get("method") or target.rpartition(".")[0].rpartition(".")[2],
        "backbone": OmegaConf.select(cfg, "method.model.backbone.name") or choices.get("backbone") or "-",
        "data": choices.get("data") or source.rpartition(".")[0].rpartition(".")[2],
        "fold": OmegaConf.select(cfg, "data.fold"),
        "shot": OmegaConf.select(cfg, "data.shot"),
        "seed": cfg.get("seed"),
        "protocol": OmegaConf.select(cfg, "data.protocol"),
    }


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[int, dict]) -> dict:
    """Mean and std over the test seeds of every scalar metric (miou, fbiou and any a method adds,
    e.g. meta_miou) and of each class's IoU."""
    results = list(runs.values())
    scalars = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {k: _mean_std([float(r[k]) for r in results]) for k in scalars if all(k in r for r in results)}
    classes = list(results[0].get("iou_per_class", {}))
    summary["iou_per_class"] = {
        c: _mean_std([r["iou_per_class"][c] for r in results if c in r["iou_per_class"]]) for c in classes
    }
    return summary


def write_results(path: str | Path, cfg: DictConfig | dict, runs: dict[int, dict], **source) -> dict:
    """results.json: the run (run_info of `cfg`, a run config such as `module.config`), how it was
    obtained (ckpt/weights), the results per test seed and their summary. The same file for `train`
    and `evaluate`; `report` reads it."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    record = {
        **{k: (str(v) if v is not None else None) for k, v in source.items()},
        "run": run_info(cfg),
        "runs": {int(k): v for k, v in runs.items()},
        "summary": summarise(runs),
    }
    Path(path).write_text(json.dumps(record, indent=2))
    return record


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


def instantiate_group(group: DictConfig | None) -> list:
    return [instantiate(v) for v in (group or {}).values() if v is not None and "_target_" in v]
