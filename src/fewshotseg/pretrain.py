"""Stage 1 of QGNet: global-local contrastive pre-training of the prior extractor, then its export.

python -m fewshotseg.pretrain data=pascal fold=0                     # trains, then exports the key encoder
python -m fewshotseg.pretrain pretrain/experiment=pascal_r50 fold=0  # the paper's full setting
python -m fewshotseg.pretrain ckpt_path=logs/pretrain/runs/<run>/checkpoints/last.ckpt   # resume
python -m fewshotseg.pretrain export=logs/pretrain/runs/<run>/checkpoints/last.ckpt      # export only

The export (`<run>/prior_extractor.pth`, or `export_path=`) is what
`python -m fewshotseg.train method=qgnet method.model.prior_extractor.weights=<file>` loads. The run
ends with that command, built from the contract of the method whose stage this is (`Stage`,
methods/base.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshotseg.cli import hydra_main, instantiate_group, user_errors
from fewshotseg.contrastive import ImagesPerSecond, export_from_checkpoint, export_prior_extractor
from fewshotseg.errors import ConfigError
from fewshotseg.loggers import finish_wandb, prepare_wandb
from fewshotseg.methods.base import registered_methods

log = logging.getLogger(__name__)


def _name_wandb_run(cfg: DictConfig) -> None:
    """The shared W&B logger config names runs after the method; name pre-training runs after the
    stage, the data and the fold instead."""
    try:
        data = HydraConfig.get().runtime.choices.get("data") or "data"
    except ValueError:  # composed without Hydra's runtime (e.g. some tests)
        data = "data"
    with open_dict(cfg):
        for logger in (cfg.get("logger") or {}).values():
            if logger is not None and "WandbLogger" in str(logger.get("_target_", "")):
                logger.name = f"pretrain-{cfg.backbone.name}-{data}-fold{cfg.fold}"
                logger.group = f"pretrain-{cfg.backbone.name}-{data}"
                logger.tags = ["pretrain", str(cfg.backbone.name), data, f"fold{cfg.fold}"]


def export_path(cfg: DictConfig, default_dir: str | Path) -> Path:
    return Path(cfg.export_path) if cfg.export_path else Path(default_dir) / "prior_extractor.pth"


def use_hint(cfg: DictConfig, path: Path, arch: str) -> str:
    """The `fewshotseg.train` command that loads this export into the method whose stage it is."""
    try:
        data = [f"data={HydraConfig.get().runtime.choices.get('data')}"]
    except ValueError:
        data = []
    commands = []
    for name, method in registered_methods().items():
        for stage in method.stages:
            if stage.produced_by == "fewshotseg.pretrain":
                load = [f"method.model.{k}={v.format(path=path, arch=arch)}" for k, v in stage.load.items()]
                args = [f"method={name}", *data, f"fold={cfg.fold}", *load]
                commands.append("python -m fewshotseg.train " + " ".join(args))
    return "; ".join(commands) or "(no method config loads it)"


def pretrain(cfg: DictConfig) -> Path | None:
    if cfg.export:  # export only, from an existing checkpoint
        ckpt = Path(cfg.export)  # default: <run>/prior_extractor_<checkpoint name>.pth
        default = ckpt.parent.parent / f"prior_extractor_{ckpt.stem}.pth"
        out = export_from_checkpoint(ckpt, Path(cfg.export_path or default), cfg.export_encoder)
        print(f"prior extractor exported to {out}")
        return out
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file to resume from")
    L.seed_everything(cfg.seed, workers=True)
    _name_wandb_run(cfg)
    prepare_wandb(cfg)
    datamodule = instantiate(cfg.unlabeled)
    module = instantiate(cfg.model)
    module.config = OmegaConf.to_container(cfg, resolve=True)  # stored in checkpoints (not instantiated)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(module.config)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    finish_wandb(loggers)
    if not trainer.is_global_zero:
        return None
    speed = next((c.rate for c in callbacks if isinstance(c, ImagesPerSecond)), None)
    if speed is not None:
        print(f"throughput: {speed:.1f} images/s ({trainer.world_size} device(s), 2 views per image)")
    out = export_prior_extractor(module, export_path(cfg, cfg.paths.output_dir), cfg.export_encoder)
    print(f"prior extractor ({module.arch}, {cfg.export_encoder} encoder) exported to {out}")
    print("use it with:", use_hint(cfg, out, module.arch))
    return out


@hydra_main("pretrain")
def main(cfg: DictConfig) -> None:
    with user_errors():
        pretrain(cfg)


if __name__ == "__main__":
    main()
