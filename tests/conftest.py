"""Shared fixtures: a small synthetic benchmark generated once per test session, and helpers to
run the CLI in-process (Hydra compose) or as a user would (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.data.sources.synthetic_gen import generate_synthetic
from fewshotseg.resolvers import synthetic_dir

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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding data/synthetic with the SMALL settings (generated once)."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root / synthetic_dir(SMALL["image_size"]), **SMALL)
    return root


@pytest.fixture(scope="session")
def synthetic_root(data_dir) -> Path:
    return data_dir / synthetic_dir(SMALL["image_size"])


def compose_train_cfg(tmp_path: Path, data_dir: Path, overrides: list[str] = ()):
    """The train config as the CLI would build it, with outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                *TINY_OVERRIDES,
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={tmp_path}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    return cfg


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
