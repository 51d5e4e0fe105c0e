"""Backbones: timm feature extractors returning named multi-scale features.

`Backbone(name, layers)` wraps `timm.create_model(name, features_only=True)` and returns a dict
{layer name: feature map}. Freezing and the BatchNorm mode are explicit: a frozen backbone runs
under no-grad; `bn_mode="eval"` keeps its BatchNorm statistics fixed, `bn_mode="train"` lets them
drift with batch statistics as the PFENet/ASGNet code does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .pth/.pt/.bin (weights only, never unpickled code) or .safetensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weight file {path} not found: download it on a machine with internet "
            "(e.g. timm's pretrained weights or the PSPNet/PFENet 'initmodel' files) and set backbone.weights=..."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    prefixes = ("module.", "backbone.", "encoder.")
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


class Backbone(nn.Module):
    def __init__(
        self,
        name: str = "resnet18",
        layers: tuple[str, ...] | list[str] = ("layer3",),
        output_stride: int | None = 8,
        pretrained: bool = False,
        weights: str | None = None,
        frozen: bool = False,
        bn_mode: str = "eval",
        **timm_kwargs,
    ):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"backbone.bn_mode={bn_mode!r}: expected 'eval' or 'train'")
        with torch.device("meta"):  # find the feature indices of the named layers without allocating
            probe = timm.create_model(name, features_only=True, pretrained=False, **timm_kwargs)
        available = probe.feature_info.module_name()
        missing = [layer for layer in layers if layer not in available]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature layer(s) {missing}: available {available}")
        self.layers = list(layers)
        indices = tuple(available.index(layer) for layer in self.layers)
        kwargs = dict(features_only=True, out_indices=indices, pretrained=pretrained and weights is None, **timm_kwargs)
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        self.body = timm.create_model(name, **kwargs)
        self.channels = dict(zip(self.layers, self.body.feature_info.channels(), strict=True))
        if weights:
            self._load(weights)
        self.frozen, self.bn_mode = frozen, bn_mode
        if frozen:
            self.body.requires_grad_(False)

    def _load(self, weights: str) -> None:
        state = load_weight_file(weights)
        own = self.body.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise ValueError(f"no tensor of {weights} matches backbone parameters (e.g. {next(iter(own))})")
        self.body.load_state_dict(matched, strict=False)
        skipped = len(own) - len(matched)
        log.info("loaded %d tensors from %s (%d backbone tensors left at init)", len(matched), weights, skipped)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and self.bn_mode == "eval":
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.body(x)
        return dict(zip(self.layers, feats, strict=True))
