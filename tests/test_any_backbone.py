"""Every method on any backbone (issue 7): each method config that takes a backbone × {ResNet-18, a
timm ConvNeXt, a DINOv2-style ViT} trains a step and tests through the CLI config (`backbone=timm
backbone.name=...`, nothing else but the tiny test settings and, where a method loads a stage's
output file, the stage's modules built without it: the contract's `Stage.restore`). Random
weights, 57 px, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.methods.base import without_stage_files
from fewshotseg.train import train
from helpers import compose_train_cfg

METHODS = sorted(
    p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml") if "backbone" in OmegaConf.load(p).model
)
BACKBONES = ["resnet18", "convnext_atto", "vit_small_patch14_dinov2"]

SHORT = [
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "data.num_val_episodes=2",
    "data.num_test_episodes=4",
    "~logger",
    "~callbacks.overlays",
]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_tests_on_any_backbone(tmp_path, data_dir, method, backbone):
    overrides = [f"method={method}", "backbone=timm", f"backbone.name={backbone}", *SHORT]
    cfg = without_stage_files(compose_train_cfg(tmp_path, data_dir, overrides))
    results = train(cfg)
    assert 0.0 <= results["miou"] <= 1.0
