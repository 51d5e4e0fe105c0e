"""Train a few-shot segmentation method, then test it on the fold's fixed novel-class episodes.

python -m fewshotseg.train method=panet data=synthetic fold=0 shot=1
python -m fewshotseg.train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume
python -m fewshotseg.train -m fold=0,1,2,3 shot=1,5                                # sweep
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from fewshotseg.callbacks import divergence_of
from fewshotseg.cli import hydra_main, instantiate_group, user_errors
from fewshotseg.loggers import finish_wandb, log_lightning_to_run_folder, prepare_wandb
from fewshotseg.methods.base import method_class
from fewshotseg.results import format_test_results, how_obtained, selection_of, write_results
from fewshotseg.runs import build_run, check_resume

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    if cfg.ckpt_path:
        check_resume(cfg)  # the same method, data, fold, shot and backbone
    L.seed_everything(cfg.seed, workers=True)
    prepare_wandb(cfg)
    datamodule, module = build_run(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_group(cfg.get("callbacks"))
    )
    for logger in loggers:
        logger.log_hyperparams(module.config)

    if any(p.requires_grad for p in module.parameters()):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        except SIGTERMException:  # SIGTERM or Ctrl-C: callbacks.KeepProgress wrote last.ckpt
            sys.exit(143)
    else:  # a training-free method, or every weight frozen (PANet on a frozen backbone)
        log.warning(
            "%s has no trainable parameter: nothing to fit, testing it as built", cfg.method.model._target_
        )
    results: dict = {}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = "" if cfg.get("selection") == "last" else best  # last: the weights in memory
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        results = module.test_results
    if cfg.get("save_weights_to"):  # a stage's output that a later run names (Sym-Net's base learner)
        save_weights(trainer, best, Path(cfg.save_weights_to))
    finish_wandb(loggers)
    if trainer.is_global_zero and results:  # the same results.json as `evaluate` writes (read by `report`)
        runs = {getattr(datamodule, "test_seed", 0): results}
        selection = selection_of(cfg.get("selection"), best)
        if (step := divergence_of(trainer)) is not None:  # so report does not average it with the rest
            selection += f"; training stopped at step {step}: the loss was not finite"
        how = how_obtained(module, datamodule, trainer, list(runs), selection)
        write_results(
            Path(cfg.paths.output_dir) / "results.json", module.config or {}, runs, how, ckpt=best or None
        )
        if method_class(cfg).task == "episodes":  # a semantic stage's module prints its own
            print(format_test_results(results, datamodule, module.tested_episodes))
    return results


def save_weights(trainer: L.Trainer, best: str, path: Path) -> None:
    """The tested weights (the selected checkpoint, or the final weights) also at `path`, written
    whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if best:
        if trainer.is_global_zero:
            shutil.copyfile(best, tmp)
    else:
        trainer.save_checkpoint(tmp, weights_only=True)  # every rank takes part
    if trainer.is_global_zero:
        os.replace(tmp, path)
        log.info("weights written to %s", path)


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    log_lightning_to_run_folder()
    with user_errors():
        results = train(cfg)
    return results.get("miou")  # the sweep objective


if __name__ == "__main__":
    main()
