"""The method contract: everything the rest of the package may ask of a method.

A method is a `Method` (an `nn.Module`) in `methods/<name>.py` with its config in
`conf/method/<name>.yaml`. Entry points, tests and benchmarks ask the class that the config's
`model._target_` names (before building it) and never a method's name or its own config keys:

- `task`: "episodes": `forward(Episode batch) -> (logits [B,2,H,W] at input resolution,
  {name: auxiliary loss})`, trained by `lit.FewShotSegModule`; or "semantic", a stage:
  `forward(images [B,3,H,W]) -> logits [B,C,H,W]` over background + the fold's base classes,
  trained by `lit_semantic.SemanticSegModule` (the method config says `task: semantic` as well, which
  the data config follows).
- `reads_class_names`: it reads `batch["class_id"]` to look the class's name up, so `predict` asks
  for `class_name=`.
- `stages`: models trained before it that it loads from files its config names (`Stage`). A
  checkpoint of the method holds their tensors, so `evaluate`/`predict ckpt=` rebuild it without
  the files.
- `official_names`: the rename table of the authors' released checkpoints (`weights=`), or None
  where there is no release to load.
- `class_name_table`: which class-name embedding table an instance reads (a file name or the
  encoder), recorded in results.json; None for a method that reads none.
- In evaluation `forward` may return `ExtraLogits` in place of its (training-only) losses: more
  logits to score, by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from fewshotseg.checkpoints import RenameTable
from fewshotseg.errors import ConfigError

TASKS = ("episodes", "semantic")
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "method"


@dataclass(frozen=True)
class ExtraLogits:
    """What a method returns in evaluation beside its logits when it has more to score: 2-class
    logits [B,2,H,W] at input resolution by name, each scored as the main ones and reported as
    `<name>_miou` and `<name>_fbiou` (Sym-Net: `meta`, its meta learner alone)."""

    logits: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """A model trained before the method (a stage) that the method loads from a file.

    module: the submodule the file fills (a checkpoint of the method holds its tensors).
    restore: `method.model` settings that build `module` without reading the file.
    produced_by: the entry point that trains the stage and writes the file.
    load: `method.model` settings that load the file (`{path}`: the file, `{arch}`: its backbone).
    """

    module: str
    restore: Mapping[str, Any]
    produced_by: str
    load: Mapping[str, str]


class Method(nn.Module):
    """Base class of every method: the contract's defaults (an episodic method that reads no class
    name, loads no stage and has no released checkpoint format)."""

    task: ClassVar[str] = "episodes"
    reads_class_names: ClassVar[bool] = False
    stages: ClassVar[tuple[Stage, ...]] = ()
    official_names: ClassVar[RenameTable | None] = None
    class_name_table: str | None = None


def method_class(cfg: DictConfig) -> type[Method]:
    """The method class a run config names (`method.model._target_`), checked to declare the
    contract and to agree with the config's `method.task`."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "method.model._target_")
    try:
        cls = get_class(str(target))
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"method.model._target_={target}: cannot import it ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"method.model._target_={target}: not a fewshotseg.methods.base.Method (the method "
            "contract, docs/contributing.md)"
        )
    task = OmegaConf.select(cfg, "method.task", default="episodes")
    if task != cls.task:
        raise ConfigError(f"method.task={task} but {target} is a {cls.task!r} method (methods/base.py)")
    return cls


def registered_methods() -> dict[str, type[Method]]:
    """Every method config (the stems of conf/method/*.yaml) and the class it builds."""
    out = {}
    for path in sorted(METHOD_CONFIGS.glob("*.yaml")):
        out[path.stem] = method_class(OmegaConf.create({"method": OmegaConf.load(path)}))
    return out


def without_stage_files(cfg: DictConfig, held: Iterable[str] | None = None) -> DictConfig:
    """`cfg` (a run config, changed in place) with the method's stages built without their files:
    those whose module the state dict keys `held` (the method's own names) hold, or all of them."""
    keys = None if held is None else list(held)
    with open_dict(cfg):
        for stage in method_class(cfg).stages:
            if keys is None or any(k.startswith(f"{stage.module}.") for k in keys):
                for key, value in stage.restore.items():
                    OmegaConf.update(cfg.method.model, key, value, force_add=True)
    return cfg
