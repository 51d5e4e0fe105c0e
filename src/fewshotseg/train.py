"""Train a few-shot segmentation method, then test it on the fold's fixed novel-class episodes.

python -m fewshotseg.train method=panet data=synthetic fold=0 shot=1
python -m fewshotseg.train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
python -m fewshotseg.train -m fold=0,1,2,3 shot=1,5                                # sweep
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from fewshotseg.cli import (
    CONFIG_DIR,
    build,
    finish_wandb,
    instantiate_group,
    prepare_wandb,
    user_errors,
    write_results,
)
from fewshotseg.errors import ConfigError
from fewshotseg.lit_semantic import build_semantic

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file to resume from")
    L.seed_everything(cfg.seed, workers=True)
    prepare_wandb(cfg)
    semantic = cfg.method.get("task") == "semantic"  # a stage such as method=pspnet_base
    datamodule, module = build_semantic(cfg) if semantic else build(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_group(cfg.get("callbacks"))
    )
    for logger in loggers:
        logger.log_hyperparams(module.config)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    results: dict = {}
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        results = module.test_results
    finish_wandb(loggers)
    if trainer.is_global_zero and results:  # the same results.json as `evaluate` writes (read by `report`)
        runs = {getattr(datamodule, "test_seed", 0): results}
        write_results(
            Path(cfg.paths.output_dir) / "results.json", module.config or {}, runs, ckpt=best or None
        )
    if trainer.is_global_zero and results and not semantic:  # SemanticSegModule prints its own
        dm = datamodule
        print(
            f"test episodes: {len(dm.test_set)} ({dm.source.name} fold {dm.fold}, {dm.shot}-shot, novel classes {dm.novel})"
        )
        for key in sorted(k for k in results if k.endswith("_miou")):  # e.g. Sym-Net's meta-only mIoU
            print(f"test {key[: -len('_miou')]}-only mIoU: {100 * results[key]:.2f}")
        print(f"test mIoU:   {100 * results['miou']:.2f}")
        print(f"test FB-IoU: {100 * results['fbiou']:.2f}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        results = train(cfg)
    return results.get("miou")  # the sweep objective


if __name__ == "__main__":
    main()
