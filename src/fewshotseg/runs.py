"""A run built from a config, from one of this package's checkpoints or from the authors' released
weights: what `train`, `evaluate` and `predict` build before they hand it to a Trainer.

- `build_run(cfg)`: the datamodule and LightningModule of a run config, chosen by the method's task
  (the method contract, methods/base.py): `build_episodic` (FewShotSegModule) for episodes,
  `lit_semantic.build_semantic` (SemanticSegModule) for a semantic stage.
- `load_model(cfg)`: the run of `ckpt=` (rebuilt from the config the checkpoint stores) or of
  `weights=` (composed as `train` composes it, the file mapped by the method's rename table).
  Stages whose tensors the checkpoint or the file holds are rebuilt without their files.

torch and Lightning are imported where they are used, so that composing a config stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from fewshotseg import checkpoints
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import method_class, without_stage_files

if TYPE_CHECKING:
    import torch
    from lightning import LightningModule

# Config groups whose choice names a run (stored in checkpoints and results.json).
_NAMED_GROUPS = ("method", "data", "backbone", "protocol", "experiment")
# Config groups that a checkpoint fixes: choosing them next to ckpt= is an error, not a silent no-op.
_FIXED_BY_CKPT = ("method", "data", "backbone", "preset", "experiment")


def _hydra_choices() -> dict:
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {g: choices.get(g) for g in _NAMED_GROUPS if choices.get(g) is not None}


# What a resumed run must share with the checkpoint's run: (name in messages, key in the config).
_RESUME_KEYS = (
    ("method", "method.model._target_"),
    ("data", "data.source._target_"),
    ("backbone", "method.model.backbone.name"),
    ("fold", "fold"),
    ("shot", "shot"),
)


def check_resume(cfg: DictConfig) -> None:
    """`ckpt_path=` must be a checkpoint of this package whose run had the same method, data, fold,
    shot and backbone as `cfg` (a ConfigError naming the keys that differ)."""
    ckpt = checkpoints.read(cfg.ckpt_path, "ckpt_path", "no such checkpoint file to resume from")
    stored = ckpt.get("fewshotseg_config") if isinstance(ckpt, dict) else None
    if stored is None or "loops" not in ckpt:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: not a checkpoint of fewshotseg.train (nothing to resume)"
        )
    stored = OmegaConf.create(stored)
    differ = []
    for name, key in _RESUME_KEYS:
        then, now = OmegaConf.select(stored, key), OmegaConf.select(cfg, key)
        if then != now:
            differ.append(f"{name}: {then} in the checkpoint, {now} here")
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} belongs to another run ({'; '.join(differ)}): resume with the "
            "run's own settings, or start a new run without ckpt_path="
        )


def build_episodic(cfg: DictConfig):
    """The episode datamodule and the FewShotSegModule of a run config."""
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
        feature_reuse=cfg.get("feature_reuse"),
        config=config,
    )
    return datamodule, module


def _unknown_timm_model(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it: Hydra wraps errors raised while instantiating) is timm's."""
    while exc is not None:
        if isinstance(exc, RuntimeError) and str(exc).startswith("Unknown model"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unknown_backbone_error(name: str) -> ConfigError:
    import difflib

    import timm

    close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "timm.list_models() lists them"
    return ConfigError(f"backbone.name={name}: timm has no such model ({hint})")


def build_run(cfg: DictConfig):
    """The datamodule and LightningModule of a run config, for the method's task."""
    try:
        if method_class(cfg).task == "semantic":
            from fewshotseg.lit_semantic import build_semantic

            return build_semantic(cfg)
        return build_episodic(cfg)
    except Exception as e:  # noqa: BLE001 - re-raised unless timm does not know the backbone's name
        name = OmegaConf.select(cfg, "method.model.backbone.name")
        if name is not None and _unknown_timm_model(e):
            raise unknown_backbone_error(name) from None
        raise


# ------------------------------------------------------------------------------------------------
# The authors' released checkpoints
# ------------------------------------------------------------------------------------------------


def read_state_file(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.tar (weights only, never unpickled code) or .safetensors file;
    unwraps the usual {'state_dict': ...} / {'model': ...} checkpoint wrappers (checkpoints.py)."""
    return checkpoints.unwrap_checked(checkpoints.read(path, key), path, key)


def official_state(cfg: DictConfig, path: str | Path) -> dict[str, torch.Tensor]:
    """The authors' checkpoint `path` in this package's names (the method's rename table)."""
    method = method_class(cfg)
    if method.official_names is None:
        raise ConfigError(
            f"{cfg.method.model._target_} declares no official names: there is no released checkpoint "
            "format to load (use ckpt=<a fewshotseg checkpoint>)"
        )
    try:
        return method.official_names.to_ours(read_state_file(path))
    except ConfigError as e:  # the rename table's complaint, about this file
        raise ConfigError(e if f"={path}" in str(e) else f"weights={path}: {e}") from e


def load_official_weights(
    module: LightningModule, cfg: DictConfig, path: str | Path, state: dict | None = None
) -> None:
    """Load the authors' checkpoint `path` into the method (`state`: the file already renamed by
    `official_state`, or None to read it), every tensor: one the file lacks, one it has in excess
    or one of another shape is a ConfigError."""
    state = official_state(cfg, path) if state is None else state
    own = module.method.state_dict()
    missing, unexpected, wrong = checkpoints.mismatch(own, state, ignore_bn_counts=False)
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in wrong]
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has other shapes of", shapes)):
        if keys:
            more = f" ... ({len(keys)} in all)" if len(keys) > 8 else ""
            raise ConfigError(
                f"weights={path} {what} tensors for this model ({cfg.method.model._target_}): "
                f"{', '.join(keys[:8])}{more}; check method=, backbone= and shot= against the release"
            )
    module.method.load_state_dict(state, strict=True)


def load_released(cfg: DictConfig):
    """The run `cfg` composes (as `train` would), with the authors' weights in `cfg.weights`."""
    cfg = cfg.copy()
    state = official_state(cfg, cfg.weights)  # read first: a bad file fails before anything is built
    with open_dict(cfg):
        backbone = cfg.method.model.get("backbone")
        if backbone is not None:  # the released file holds the backbone too: nothing to download
            backbone.pretrained, backbone.weights = False, None
        if cfg.get("num_test_episodes"):
            cfg.data.num_test_episodes = cfg.num_test_episodes
    without_stage_files(cfg, held=state)  # the file holds them too
    datamodule, module = build_run(cfg)
    load_official_weights(module, cfg, cfg.weights, state)
    return cfg, datamodule, module


# ------------------------------------------------------------------------------------------------
# This package's checkpoints
# ------------------------------------------------------------------------------------------------


def load_run(ckpt_path: str, overrides: DictConfig):
    """The module (with the checkpoint's weights) and datamodule of a training run. `overrides`:
    data.* keys that replace the stored ones, num_test_episodes, eval_resolution (null: as stored)."""
    ckpt = checkpoints.read(ckpt_path, "ckpt", "no such checkpoint file")
    if not isinstance(ckpt, dict) or "fewshotseg_config" not in ckpt:
        raise ConfigError(f"ckpt={ckpt_path} was not written by fewshotseg.train (no stored run config)")
    cfg = OmegaConf.create(ckpt["fewshotseg_config"])
    cfg.choices = cfg.get("choices") or {}  # older checkpoints: never the evaluating app's choices
    cfg.method.model.backbone.pretrained = False  # the weights come from the checkpoint
    cfg.method.model.backbone.weights = None
    held = [k[len("method.") :] for k in ckpt["state_dict"] if k.startswith("method.")]
    without_stage_files(cfg, held)  # the checkpoint holds the stages' tensors too
    given = {k: v for k, v in (overrides.get("data") or {}).items() if v is not None}
    cfg.data = OmegaConf.merge(cfg.data, given)
    if overrides.get("num_test_episodes"):
        cfg.data.num_test_episodes = overrides.num_test_episodes
    if overrides.get("eval_resolution"):
        cfg.eval_resolution = overrides.eval_resolution
    datamodule, module = build_run(cfg)
    module.load_state_dict(ckpt["state_dict"])
    backbone = getattr(module.method, "backbone", None)
    if backbone is not None and ckpt.get("backbone_start"):  # recorded as training recorded it
        backbone.start = ckpt["backbone_start"]
    return cfg, datamodule, module


def command_line_overrides(cfg: DictConfig) -> DictConfig:
    """The data settings the user gave on the command line (data.*, protocol=, fold=, shot=), for
    ckpt= runs; everything else in `cfg.data` is only the composed default."""
    out = OmegaConf.create({"data": {}})
    if not HydraConfig.initialized():
        return out
    hydra_cfg = HydraConfig.get()
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in _FIXED_BY_CKPT:
            raise ConfigError(
                f"{key}= cannot be combined with ckpt=: the checkpoint fixes the method, data and backbone "
                "(data.* keys, protocol=, fold= and shot= override single settings)"
            )
        if key.startswith("data.") and not override.is_delete():
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
        elif key in ("fold", "shot"):
            out.data[key] = cfg[key]
    if hydra_cfg.runtime.choices.get("protocol"):
        out.data.protocol = cfg.data.protocol
    return out


def seed_list(seeds) -> list[int]:
    """`seeds=` as a list of integers (one integer is a list of one); ConfigError otherwise."""
    values = list(seeds) if isinstance(seeds, (list, tuple, ListConfig)) else [seeds]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(f"seeds={seeds}: expected a list of integers, e.g. seeds=[0,1,2,3,4]")
    if len(set(values)) < len(values):
        raise ConfigError(
            f"seeds={seeds}: a seed is repeated; expected distinct seeds, e.g. seeds=[0,1,2,3,4]"
        )
    return values


def load_model(cfg: DictConfig):
    """(run config, datamodule, module) from `ckpt=` (ours) or `weights=` (the authors'), exactly one."""
    if bool(cfg.get("ckpt")) == bool(cfg.get("weights")):
        raise ConfigError(
            "give ckpt=<a fewshotseg checkpoint> or method=<m> data=<d> fold=<f> shot=<k> weights=<the authors' "
            "file>, not both"
            if cfg.get("ckpt")
            else "no model: give ckpt=<a fewshotseg checkpoint> or method=<m> ... weights=<the authors' file>"
        )
    if cfg.ckpt:
        overrides = command_line_overrides(cfg)
        overrides.num_test_episodes = cfg.get("num_test_episodes")
        overrides.eval_resolution = cfg.get("eval_resolution")
        return load_run(cfg.ckpt, overrides)
    return load_released(cfg)
