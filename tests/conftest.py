"""Shared fixtures: a small synthetic benchmark generated once per test session. The helpers the
test modules share (episodes, Hydra compose, running the CLI, dataset fixtures) live in tests/helpers/
and import as `helpers`; no test module imports another."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ on sys.path, so that `import helpers` works under any pytest import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from fewshotseg.data.sources.synthetic_gen import generate_synthetic  # noqa: E402
from fewshotseg.resolvers import synthetic_dir  # noqa: E402
from helpers.configs import SMALL, TINY_OVERRIDES, compose_train_cfg, run_cli  # noqa: E402, F401


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding data/synthetic with the SMALL settings (generated once)."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root / synthetic_dir(SMALL["image_size"]), **SMALL)
    return root


@pytest.fixture(scope="session")
def synthetic_root(data_dir) -> Path:
    return data_dir / synthetic_dir(SMALL["image_size"])
