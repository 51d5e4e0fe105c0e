"""Helpers of the tool tests: one tiny trained PANet run shared by the tests of evaluate, predict,
report and the notebook (trained once per test session, in-process, on the session's synthetic
data), and a tool's config composed as its CLI composes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.configs import compose_config, compose_train_cfg

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
    return compose_config(config_name, overrides, output_dir=out)
