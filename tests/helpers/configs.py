"""Configs as the command line composes them (Hydra compose on the package's conf/), the tiny
settings the CLI tests share, and a way to run a CLI as a user would (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fewshotseg.cli import CONFIG_DIR

SMALL = dict(seed=0, num_train=60, num_val=40, image_size=64)

# Tiny, fast settings every CLI test shares (64 px images, 57 px crops, a handful of steps).
TINY_OVERRIDES = [
    "debug=tiny",
    f"data.source.num_train={SMALL['num_train']}",
    f"data.source.num_val={SMALL['num_val']}",
    f"data.source.image_size={SMALL['image_size']}",
    "data.train_transform.crop_size=57",
    "data.test_transform.size=57",
    "~callbacks.progress_bar",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]

# A short train-and-test run on top of the tiny settings (2 training steps, 4 test episodes).
SHORT = [
    "test=true",
    "data.num_test_episodes=4",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
]


def compose_config(
    config_name: str = "train", overrides: Sequence[str] = (), output_dir: Path | str | None = None
) -> DictConfig:
    """The config `config_name` with `overrides`, composed from the package's conf/.

    With `output_dir`, it is composed as the CLI's @hydra.main does: the Hydra runtime config is set
    (output folder `output_dir`, job 0) so that the code sees the command-line overrides, then
    `paths.output_dir` is set and the `hydra` node dropped."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=output_dir is not None
        )
    if output_dir is None:
        return cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def compose_train_cfg(tmp_path: Path, data_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The train config as the CLI would build it, tiny settings, outputs under tmp_path."""
    return compose_config(
        "train",
        [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}", *overrides],
        output_dir=tmp_path,
    )


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a user would; returns the finished process (no check).
    `env` entries set to None are removed from the environment."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
