"""Helpers shared by the test modules (no test module imports another): episodes, configs composed
as the CLI composes them, small models, on-disk dataset fixtures, the tiny trained run and the
backbone reference outputs. tests/ is on sys.path (tests/conftest.py), so they import as `helpers`."""

from helpers.configs import (
    SHORT,
    SMALL,
    TINY_OVERRIDES,
    compose_config,
    compose_train_cfg,
    run_cli,
)
from helpers.episodes import SIZE, episode
from helpers.models import build_on_meta, tiny_backbone

__all__ = [
    "SHORT",
    "SIZE",
    "SMALL",
    "TINY_OVERRIDES",
    "build_on_meta",
    "compose_config",
    "compose_train_cfg",
    "episode",
    "run_cli",
    "tiny_backbone",
]
