"""Backbones: feature extractors returning named multi-scale features.

`Backbone(name, layers)` returns a dict {layer name: feature map} and knows each layer's channels
and stride (`.channels`, `.reduction`). `name` selects the builder:

- `resnet50_psp`, `resnet101_psp`: the PSPNet "deep-base" ResNet of the PFENet family (ASGNet,
  PFENet, QGNet, ...): timm's `resnet50s`/`resnet101s` (3x3 stem 64-64-128, plain strided
  shortcut), output stride 8 with PSPNet's dilation (specs/backbones.md §1). Local weights:
  hszhao/semseg's `resnet{50,101}_v2.pth` (PSPNet key names are remapped to timm's); or timm's
  `pretrained=true` download (`resnet50s.gluon_in1k`, a different ImageNet run).
- `vgg16_panet`: PANet's stride-8 VGG-16 encoder (specs/panet.md §1). Local weights: torchvision's
  `vgg16-397923af.pth`; or timm's `vgg16.tv_in1k` download (the same weights).
- anything else: `timm.create_model(name, features_only=True)`.

Freezing and the BatchNorm mode are explicit: a frozen backbone runs under no-grad; `bn_mode="eval"`
keeps its BatchNorm statistics fixed, `bn_mode="train"` lets them drift with batch statistics as the
PFENet/ASGNet code does (BN layers follow the module's train/eval mode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from fewshotseg.errors import ConfigError

log = logging.getLogger(__name__)

# PSPNet deep-base ResNets and the timm architecture with the same layout.
PSP_RESNETS = {"resnet50_psp": "resnet50s", "resnet101_psp": "resnet101s"}
PSP_DILATION = {"layer3": 2, "layer4": 4}

# PSPNet stem names -> timm deep-stem names (backbones.md §7.1); `layer0.i` is the stem as the
# PFENet/ASGNet models wrap it (Sequential conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, ...).
_PSP_STEM = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}
_PFENET_STEM = {"layer0.0": "conv1.0", "layer0.1": "conv1.1", "layer0.3": "conv1.3", "layer0.4": "conv1.4",
                "layer0.6": "conv1.6", "layer0.7": "bn1"}  # fmt: skip

_WEIGHT_HINTS = {
    "resnet50_psp": "resnet50_v2.pth from the PSPNet/PFENet 'initmodel' Google Drive folder (PFENet README)",
    "resnet101_psp": "resnet101_v2.pth from the PSPNet/PFENet 'initmodel' Google Drive folder (PFENet README)",
    "vgg16_panet": "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision)",
}


def load_weight_file(path: str | Path, hint: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local .pth/.pt/.bin (weights only, never unpickled code) or .safetensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        where = hint or "timm's pretrained weights or the PSPNet/PFENet 'initmodel' files"
        raise ConfigError(
            f"backbone.weights={path}: file not found: download {where} on a machine with internet "
            "and set backbone.weights=<path>"
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


# ------------------------------------------------------------------------------------------------
# PSPNet deep-base ResNet
# ------------------------------------------------------------------------------------------------


def psp_dilate(body: nn.Module) -> None:
    """PSPNet/PFENet dilation surgery for output stride 8: every block of layer3 (layer4) gets a
    stride-1 conv2 with dilation = padding = 2 (4) and a stride-1 shortcut, the first block
    included. timm's own output_stride=8 gives a dilated stage's first block the previous stage's
    dilation (the torchvision/DeepLab convention), which is not what the PFENet family trained with."""
    for stage, dilation in PSP_DILATION.items():
        layer = getattr(body, stage, None)
        if layer is None:  # pruned by features_only (not requested)
            continue
        for block in layer:
            block.conv2.stride = (1, 1)
            block.conv2.dilation = block.conv2.padding = (dilation, dilation)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def psp_resnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a PSPNet (`conv1, bn1, conv2, bn2, conv3, bn3`) or PFENet-model (`layer0.i`) stem to
    timm's deep-stem names (`conv1.0, conv1.1, conv1.3, conv1.4, conv1.6, bn1`); `layerN.i.*` keys
    are the same in both. A state dict already in timm's layout (`conv1.0.weight`) is unchanged."""
    if "conv1.0.weight" in state:
        return dict(state)
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _PSP_STEM:
            key = f"{_PSP_STEM[head]}.{rest}"
        elif key.startswith("layer0."):
            prefix = ".".join(key.split(".")[:2])
            if prefix not in _PFENET_STEM:
                continue  # relu / max-pool: no tensors
            key = _PFENET_STEM[prefix] + key[len(prefix) :]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# PANet's VGG-16
# ------------------------------------------------------------------------------------------------

# Indices of the 13 convs in torchvision's / timm's `vgg16.features`, grouped by block.
_VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_VGG16_WIDTHS = (64, 128, 256, 512, 512)


class PANetVGG16(nn.Module):
    """PANet's VGG-16 encoder (`models/vgg.py::Encoder`): the 13 convs of VGG-16, 3x3/s2/p1 max-pools
    after blocks 1-3, a 3x3/s1/p1 pool after block 4, dilation 2 in block 5, no ReLU after conv5_3;
    output stride 8 (417 -> 53), 14,714,688 parameters.

    `features` keeps torchvision's module indices (pools at 4, 9, 16, 23), so torchvision's and
    timm's `features.N.*` weights load as they are. Feature names: `block1`..`block5`, the output of
    each block's last conv (after its ReLU; `block5` = conv5_3 without ReLU = PANet's features).
    """

    layer_names = ("block1", "block2", "block3", "block4", "block5")
    channels = dict(zip(layer_names, _VGG16_WIDTHS, strict=True))
    reduction = dict(zip(layer_names, (1, 2, 4, 8, 8), strict=True))

    def __init__(self, layers: list[str]):
        super().__init__()
        modules: list[nn.Module] = []
        self.ends: list[int] = []  # index of the last module of each block
        in_ch = 3
        for b, (convs, width) in enumerate(zip(_VGG16_BLOCKS, _VGG16_WIDTHS, strict=True)):
            dilation = 2 if b == 4 else 1
            for j, idx in enumerate(convs):
                assert len(modules) == idx
                modules.append(nn.Conv2d(in_ch, width, 3, padding=dilation, dilation=dilation))
                in_ch = width
                if not (b == 4 and j == len(convs) - 1):  # lastRelu=False
                    modules.append(nn.ReLU(inplace=True))
            self.ends.append(len(modules) - 1)
            if b < 4:
                modules.append(nn.MaxPool2d(3, stride=2 if b < 3 else 1, padding=1))
        self.features = nn.Sequential(*modules)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # PANet's init before the pretrained copy
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.layers = list(layers)
        self.out = [self.ends[self.layer_names.index(layer)] for layer in layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        found = {}
        for i, module in enumerate(self.features[: max(self.out) + 1]):
            x = module(x)
            if i in self.out:
                found[i] = x
        return [found[i] for i in self.out]


def panet_vgg_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PANet checkpoints nest the convs as `features.{2*block}.{2*conv}`; map them to torchvision's
    flat `features.N` indices (torchvision/timm files pass unchanged)."""
    starts = {2 * b: convs[0] for b, convs in enumerate(_VGG16_BLOCKS)}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "features" and int(parts[1]) in starts:
            key = f"features.{starts[int(parts[1])] + int(parts[2])}.{parts[3]}"
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# The wrapper every method uses
# ------------------------------------------------------------------------------------------------


def _check_layers(name: str, layers: list[str], available: list[str]) -> list[str]:
    """The requested layers, validated, without repeats, in network order (the order features come out)."""
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ConfigError(f"backbone {name!r} has no feature layer(s) {missing}: available {available}")
    return sorted(set(layers), key=available.index)


def _timm_body(
    name: str, layers: list[str], output_stride: int | None, pretrained: bool, **kwargs
) -> nn.Module:
    with torch.device("meta"):  # find the feature indices of the named layers without allocating
        probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    available = probe.feature_info.module_name()
    indices = tuple(available.index(layer) for layer in _check_layers(name, layers, available))
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    return timm.create_model(name, features_only=True, out_indices=indices, pretrained=pretrained, **kwargs)


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
            raise ConfigError(f"backbone.bn_mode={bn_mode!r}: expected 'eval' or 'train'")
        self.name = name
        download = pretrained and not weights  # a local file wins over timm's download
        self._remap: Callable[[dict], dict] = dict
        if name in PSP_RESNETS or name == "vgg16_panet":
            if output_stride not in (None, 8):
                raise ConfigError(
                    f"backbone {name!r} has output stride 8 only, got backbone.output_stride={output_stride}"
                )
        if name in PSP_RESNETS:
            self.body = _timm_body(PSP_RESNETS[name], layers, 8, download, **timm_kwargs)
            psp_dilate(self.body)
            self._remap = psp_resnet_keys
        elif name == "vgg16_panet":
            if timm_kwargs:
                raise ConfigError(f"backbone 'vgg16_panet' takes no extra options, got {sorted(timm_kwargs)}")
            self.body = PANetVGG16(_check_layers(name, layers, list(PANetVGG16.layer_names)))
            self._remap = panet_vgg_keys
            if download:  # timm's vgg16.tv_in1k = torchvision's vgg16-397923af weights
                tv = timm.create_model("vgg16.tv_in1k", pretrained=True)
                self._load_state(
                    {k: v for k, v in tv.state_dict().items() if k.startswith("features.")},
                    "timm vgg16.tv_in1k",
                )
        else:
            self.body = _timm_body(name, layers, output_stride, download, **timm_kwargs)
        if isinstance(self.body, PANetVGG16):
            self.layers = self.body.layers
            self.channels = {layer: PANetVGG16.channels[layer] for layer in self.layers}
            self.reduction = {layer: PANetVGG16.reduction[layer] for layer in self.layers}
        else:
            info = self.body.feature_info
            self.layers = info.module_name()  # network order, the order of the outputs
            self.channels = dict(zip(self.layers, info.channels(), strict=True))
            self.reduction = dict(zip(self.layers, info.reduction(), strict=True))
        if weights:
            self._load_state(load_weight_file(weights, _WEIGHT_HINTS.get(name)), str(weights))
        self.frozen, self.bn_mode = frozen, bn_mode
        self._has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.body.modules())
        if frozen:
            self.body.requires_grad_(False)
            if not weights and not pretrained and next(self.body.parameters()).device.type != "meta":
                log.warning(
                    "backbone %s is frozen with random weights: its features will not improve. Give "
                    "backbone.weights=<file> (or backbone.pretrained=true), or train it: backbone.frozen=false",
                    name,
                )

    def _load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy every tensor whose (remapped) name is a backbone tensor; a shape mismatch is an error,
        backbone tensors the file lacks are reported, extra file tensors (fc, unused stages) ignored."""
        state = self._remap(state)
        own = self.body.state_dict()
        matched = {k: v for k, v in state.items() if k in own}
        if not matched:
            raise ConfigError(
                f"no tensor of {source} matches a parameter of backbone {self.name!r} (e.g. {next(iter(own))!r})"
            )
        for k, v in matched.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ConfigError(
                    f"{source}: tensor {k!r} has shape {tuple(v.shape)}, backbone {self.name!r} expects {tuple(own[k].shape)}"
                )
        self.body.load_state_dict(matched, strict=False)
        missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
        if missing:
            log.warning(
                "%s lacks %d tensors of backbone %r (left at init), e.g. %s",
                source,
                len(missing),
                self.name,
                missing[:5],
            )
        log.info(
            "loaded %d tensors from %s into backbone %r (%d file tensors unused)",
            len(matched),
            source,
            self.name,
            len(state) - len(matched),
        )

    @property
    def uses_batch_stats(self) -> bool:
        """True while BatchNorm layers normalise with (and update from) batch statistics."""
        return self.training and self.bn_mode == "train" and self._has_bn

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
