"""Small models for the method tests: a ResNet-18 backbone factory and configured models built on
the meta device."""

from __future__ import annotations

import functools

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fewshotseg.backbones import Backbone


def tiny_backbone(bn_mode="eval", frozen=True):
    return functools.partial(Backbone, name="resnet18", bn_mode=bn_mode, frozen=frozen)


def build_on_meta(cfg, **model_overrides):
    """The configured model with random weights on the meta device (no weight files, no compute)."""
    model_cfg = OmegaConf.merge(cfg.method.model, {"backbone": {"weights": None}}, model_overrides)
    with torch.device("meta"):
        return instantiate(model_cfg)
