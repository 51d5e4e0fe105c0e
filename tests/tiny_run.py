"""Helpers of the tool tests: one tiny trained PANet run shared by the tests of evaluate, predict,
report and the notebook (trained once per test session, in-process, on the session's synthetic
data), and a tool's config composed as its CLI composes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import compose_train_cfg
from fewshotseg.cli import CONFIG_DIR

_RUNS: dict[Path, Path] = {}


def tiny_trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The run folder (checkpoints/, csv/, results.json) of PANet trained for 4 steps, tested on 16
    episodes. Cached for the session (per data folder)."""
    if data_dir not in _RUNS:
        from fewshotseg.train import train

        run = tmp_path_factory.mktemp("tiny_run")
        train(compose_train_cfg(run, data_dir, ["method=panet", "seed=3", "data.num_test_episodes=8"]))
        _RUNS[data_dir] = run
    return _RUNS[data_dir]


def best_checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("best-*.ckpt"))


def compose_tool(config_name: str, overrides: list[str], out: Path):
    """A tool's config as its CLI composes it (the Hydra runtime config set, as under @hydra.main,
    so that the tool sees the command-line overrides)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg.hydra
    return cfg
