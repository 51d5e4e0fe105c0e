"""Backbones: feature extractors that return their features by *level*.

`Backbone(name, levels=[2, 3, 4])(x)` returns {level: feature map} and knows each level's channels
and stride (`.channels`, `.reduction`). Methods ask for the levels their paper uses by role, never
for a layer name only ResNets have: 0 = stem, 1..4 = the four stages (ResNet layer1..layer4,
ConvNeXt stages, PANet VGG blocks 2..5, a ViT's evenly spaced blocks). The PFENet family's "mid"
features are levels (3, 2) (`fuse_levels`), "high" is level 4; PANet uses one level. `name`
selects the builder:

- `resnet50_psp`, `resnet101_psp`: the PSPNet "deep-base" ResNet of the PFENet family (ASGNet,
  PFENet, QGNet, ...): timm's `resnet50s`/`resnet101s` (3x3 stem 64-64-128, plain strided
  shortcut), output stride 8 with PSPNet's dilation (docs/contributing.md). Local weights:
  hszhao/semseg's `resnet{50,101}_v2.pth` (PSPNet key names are remapped to timm's); or timm's
  `pretrained=true` download (`resnet50s.gluon_in1k`, a different ImageNet run).
- `resnet50_dilated`: timm's `resnet50` (standard 7x7 stem, torchvision key names) with the same
  PSPNet dilation: QGNet's prior extractor.
- `vgg16_panet`: PANet's stride-8 VGG-16 encoder (docs/methods/panet.md). Local weights: torchvision's
  `vgg16-397923af.pth`; or timm's `vgg16.tv_in1k` download (the same weights).
- any other timm CNN: `timm.create_model(name, features_only=True)` at output stride 8 where timm
  can dilate it (ResNets, ConvNeXt, ...), else its native strides (VGG, ...); methods resize the
  coarser maps to the finer one (`fuse_levels`), as the official code does for VGG.
- any timm plain ViT (`vit_small_patch14_dinov2`, DeiT, ...): at any input size (timm's dynamic
  image size, inputs padded to a multiple of the patch), levels = blocks at depth/4, depth/2,
  3 depth/4 and depth, the patch grid as the map.

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
import torch.nn.functional as F
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.errors import ConfigError

log = logging.getLogger(__name__)

# PSPNet deep-base ResNets and the timm architecture with the same layout.
PSP_RESNETS = {
    "resnet50_psp": "resnet50s",
    "resnet101_psp": "resnet101s",
    "resnet50_dilated": "resnet50",  # standard 7x7 stem (torchvision names): QGNet's prior extractor
}
PSP_DILATION = {"layer3": 2, "layer4": 4}

# PSPNet stem names -> timm deep-stem names (docs/contributing.md); `layer0.i` is the stem as the
# PFENet/ASGNet models wrap it (Sequential conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, ...).
# PSPNet's own stem names (hszhao/semseg's resnet*_v2.pth) -> timm's deep-stem names (docs/contributing.md); `layer0.i` is the stem as the PFENet/ASGNet models wrap it (checkpoints.PSP_STEM).
_PSP_STEM = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}
_PFENET_STEM = {f"layer0.{i}": name for i, name in checkpoints.PSP_STEM.items()}

_WEIGHT_HINTS = {
    "resnet50_psp": "resnet50_v2.pth from the PSPNet/PFENet 'initmodel' Google Drive folder (PFENet README)",
    "resnet101_psp": "resnet101_v2.pth from the PSPNet/PFENet 'initmodel' Google Drive folder (PFENet README)",
    "vgg16_panet": "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision)",
}


def load_weight_file(
    path: str | Path, hint: str | None = None, made_by: str | None = None
) -> dict[str, torch.Tensor]:
    """A state dict from a local .pth/.pt/.bin (weights only, never unpickled code) or .safetensors;
    also this package's own Lightning checkpoints (`method.backbone.body.*`, see checkpoints.py)."""
    where = hint or "timm's pretrained weights or the PSPNet/PFENet 'initmodel' files"
    missing = f"file not found: download {where} on a machine with internet and set backbone.weights=<path>"
    if made_by:  # a file this package makes (backbone=resnet18_synthetic)
        missing = f"file not found: make it with `{made_by}`"
    state = checkpoints.read_state_dict(path, "backbone.weights", missing)
    own = checkpoints.package_backbone_state(state)
    if own is not None:
        return own
    for prefix in ("backbone.", "encoder."):
        state = checkpoints.strip_prefix(state, prefix)
    return state


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
    timm's `features.N.*` weights load as they are. Levels 0..4 are blocks 1..5, each the output of
    the block's last conv (after its ReLU; level 4 = conv5_3 without ReLU = PANet's features).
    `Backbone` runs `features` itself and takes the levels it needs.
    """

    reductions = (1, 2, 4, 8, 8)  # per block

    def __init__(self):
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
# Levels
# ------------------------------------------------------------------------------------------------

LEVELS = (0, 1, 2, 3, 4)  # 0 = stem, 1..4 = the four stages


def _check_levels(name: str, levels, available) -> tuple[int, ...]:
    """The requested levels, validated, without repeats, in network order."""
    levels = tuple(sorted({int(level) for level in levels}))
    missing = [level for level in levels if level not in available]
    if not levels or missing:
        raise ConfigError(
            f"backbone {name!r} has no feature level(s) {missing or '(none requested)'}: available {sorted(available)}"
        )
    return levels


def _timm_cnn(name: str, levels, output_stride: int | None, pretrained: bool, dilate=None, **kwargs):
    """A timm features_only CNN with the requested levels (its last four feature stages are levels
    1..4, an earlier one, the stem, level 0) -> (net, {level: module name}, levels). Output stride
    `output_stride` where timm can dilate the model, otherwise its native strides (logged);
    `dilate` is a surgery applied after building at output stride 8 (PSPNet's)."""
    with torch.device("meta"):  # the full list of feature stages, without allocating
        probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    n = len(probe.feature_info)
    if n < 4:
        raise ConfigError(
            f"backbone {name!r} has {n} feature stages; a backbone needs at least 4 (levels 1..4)"
        )
    levels = _check_levels(name, levels, range(max(0, 5 - n), 5))
    modules = probe.feature_info.module_name()
    level_module = {level: modules[n - 5 + level].replace(".", "_") for level in levels}
    if dilate is not None:
        kwargs["output_stride"] = 8
    elif output_stride is not None:
        try:
            with torch.device("meta"):
                timm.create_model(name, features_only=True, output_stride=output_stride, **kwargs)
            kwargs["output_stride"] = output_stride
        except (AssertionError, TypeError, ValueError) as err:
            log.info(
                "backbone %s: no output_stride=%s in timm (%s); native strides", name, output_stride, err
            )
    net = timm.create_model(
        name,
        features_only=True,
        out_indices=tuple(n - 5 + lv for lv in levels),
        pretrained=pretrained,
        **kwargs,
    )
    if dilate is not None:
        dilate(net)
    return net, level_module, levels


def _is_plain_vit(net: nn.Module) -> bool:
    return all(hasattr(net, a) for a in ("blocks", "patch_embed", "forward_intermediates", "cls_token"))


def _vit_level_blocks(depth: int) -> dict[int, int]:
    """Level l (1..4) = block depth*l/4 - 1 (evenly spaced, the last block is level 4); 0 = patches."""
    return {0: -1, **{level: depth * level // 4 - 1 for level in range(1, 5)}}


def fuse_levels(feats: dict[int, torch.Tensor], levels) -> torch.Tensor:
    """cat(feats[l] for l in levels) in the given order, each resized (bilinear, align_corners=True,
    as the PFENet family resizes VGG's layer2) to the largest map among them; no resize where the
    sizes agree (the OS-8 paper backbones)."""
    maps = [feats[level] for level in levels]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=True)
            for m in maps]  # fmt: skip
    return torch.cat(maps, 1)


# ------------------------------------------------------------------------------------------------
# The wrapper every method uses
# ------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """Features by level for any backbone: `Backbone(name, levels=[2, 3, 4])(x) -> {level: map}`.

    Levels: 0 = stem, 1..4 = the four stages (ResNet layer1..layer4; `vgg16_panet` block2..block5,
    block1 = 0; ConvNeXt stages 0..3; a plain ViT's blocks at depth/4, depth/2, 3 depth/4 and
    depth, the patch grid as the map). `channels[level]`, `reduction[level]` (stride) per requested
    level; `run_stage(x, level)` runs only the stage that produces `level` from a map of the
    previous level (PFENet's support layer4 from the masked layer3).

    channels_last: convolutional backbones run their no-gradient passes (a frozen backbone; any
    evaluation) in channels_last memory format: the same numbers within float rounding, faster on
    CPU (`make bench`, section memory_format). Passes that backpropagate stay in NCHW and return
    NCHW maps, because on this project's CPU the channels_last backward was slower (training
    0.6-0.7x); a GPU user may measure otherwise. ViTs ignore it.
    """

    def __init__(
        self,
        name: str = "resnet18",
        levels: tuple[int, ...] | list[int] = (3,),
        output_stride: int | None = 8,
        pretrained: bool = False,
        weights: str | None = None,
        weights_from: str | None = None,
        frozen: bool = False,
        bn_mode: str = "eval",
        channels_last: bool = True,
        **timm_kwargs,
    ):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise ConfigError(f"backbone.bn_mode={bn_mode!r}: expected 'eval' or 'train'")
        self.name = name
        download = pretrained and not weights  # a local file wins over timm's download
        self._remap: Callable[[dict], dict] = dict
        self.is_vit = False
        if name in PSP_RESNETS or name == "vgg16_panet":
            if output_stride not in (None, 8):
                raise ConfigError(
                    f"backbone {name!r} has output stride 8 only, got backbone.output_stride={output_stride}"
                )
        if name in PSP_RESNETS:
            self.body, self.level_module, self.levels = _timm_cnn(
                PSP_RESNETS[name], levels, 8, download, dilate=psp_dilate, **timm_kwargs
            )
            self._remap = psp_resnet_keys if name != "resnet50_dilated" else dict
            info = self.body.feature_info
            self.channels = dict(zip(self.levels, info.channels(), strict=True))
            self.reduction = dict(zip(self.levels, info.reduction(), strict=True))
        elif name == "vgg16_panet":
            if timm_kwargs:
                raise ConfigError(f"backbone 'vgg16_panet' takes no extra options, got {sorted(timm_kwargs)}")
            self.levels = _check_levels(name, levels, LEVELS)
            self.body = PANetVGG16()
            self.level_module = {level: str(self.body.ends[level]) for level in self.levels}
            self.channels = {level: _VGG16_WIDTHS[level] for level in self.levels}
            self.reduction = {level: PANetVGG16.reductions[level] for level in self.levels}
            self._remap = panet_vgg_keys
            if download:  # timm's vgg16.tv_in1k = torchvision's vgg16-397923af weights
                tv = timm.create_model("vgg16.tv_in1k", pretrained=True)
                self._load_state(
                    {k: v for k, v in tv.state_dict().items() if k.startswith("features.")},
                    "timm vgg16.tv_in1k",
                )
        else:
            with torch.device("meta"):
                probe = timm.create_model(name, pretrained=False, **timm_kwargs)
            if _is_plain_vit(probe):
                self.is_vit, channels_last = True, False
                kwargs = {"dynamic_img_size": True, "dynamic_img_pad": True, "num_classes": 0, **timm_kwargs}
                self.body = timm.create_model(name, pretrained=download, **kwargs)
                self.levels = _check_levels(name, levels, LEVELS)
                self.level_block = _vit_level_blocks(len(self.body.blocks))
                last = max(self.level_block[level] for level in self.levels)
                del self.body.blocks[last + 1 :]  # blocks past the deepest level are never run
                self.channels = dict.fromkeys(self.levels, self.body.embed_dim)
                self.reduction = dict.fromkeys(self.levels, self.body.patch_embed.patch_size[0])
            else:
                self.body, self.level_module, self.levels = _timm_cnn(
                    name, levels, output_stride, download, **timm_kwargs
                )
                info = self.body.feature_info
                self.channels = dict(zip(self.levels, info.channels(), strict=True))
                self.reduction = dict(zip(self.levels, info.reduction(), strict=True))
        # where the weights came from, recorded with every result (`training_regime` below): a file by
        # its name and the digest of its tensors, since a file made again can hold others
        self.start = "timm ImageNet weights" if download else "random init"
        if weights:
            state = load_weight_file(weights, _WEIGHT_HINTS.get(name), weights_from)
            self._load_state(state, str(weights))
            self.start = f"{Path(weights).name} (sha256 {checkpoints.state_digest(state)})"
        self.frozen, self.bn_mode, self.channels_last = frozen, bn_mode, channels_last
        # set during evaluation while this frozen backbone's maps may be reused (feature_cache.py)
        self.feature_cache = None
        if channels_last and frozen:  # never backpropagated: channels_last weights too
            self.body.to(memory_format=torch.channels_last)
        self._has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.body.modules())
        # bn_mode=eval must hold from construction: Lightning does not call .train() before fitting,
        # and restores per-module modes after validation, so the override below alone is not enough.
        self.train(self.training)
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
    def training_regime(self) -> str:
        """Where the weights started and whether they train: results.json's `backbone_training`."""
        return f"from {self.start}, {'frozen' if self.frozen else 'trained'}, BN {self.bn_mode}"

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

    def _grad(self):
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        """channels_last for passes without gradient (called inside `_grad`), NCHW otherwise."""
        if self.channels_last and not torch.is_grad_enabled():
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _ordered_modules(self) -> list[tuple[str, nn.Module]]:
        """The CNN's modules in network order (PANet's VGG: `features` indices)."""
        if isinstance(self.body, PANetVGG16):
            return [(str(i), m) for i, m in enumerate(self.body.features)]
        return list(self.body.items())

    def forward(self, x: torch.Tensor, levels=None) -> dict[int, torch.Tensor]:
        """{level: map} for the built levels, or for `levels`, a subset of them: the stages after
        the deepest one asked for are not run (PFENet's support pass stops at level 3, runs level 4
        on the masked map, and must not update level 4's BN statistics with the unmasked one)."""
        if levels is None:
            levels = self.levels
        elif not set(levels) <= set(self.levels):
            raise ConfigError(
                f"backbone {self.name!r}: levels {sorted(levels)} are not all built: {self.levels}"
            )
        if torch.is_grad_enabled() and self.channels_last:  # heads that backpropagate get NCHW maps
            return {level: f.contiguous() for level, f in self._forward(x, levels).items()}
        if self.feature_cache is not None and not torch.is_grad_enabled():  # images seen before: kept maps
            return self.feature_cache.rows(
                self, x, levels, lambda images: self._forward(images, levels), self._map_format
            )
        return self._forward(x, levels)

    @property
    def _map_format(self) -> torch.memory_format:
        """The memory format of the maps of a no-gradient pass."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _forward(self, x: torch.Tensor, levels) -> dict[int, torch.Tensor]:
        with self._grad():
            if self.is_vit:
                return self._vit_forward(x, levels)
            x = self._format(x)
            wanted = {self.level_module[level]: level for level in levels}
            out: dict[int, torch.Tensor] = {}
            for name, module in self._ordered_modules():
                x = module(x)
                if name in wanted:
                    out[wanted[name]] = x
                    if len(out) == len(wanted):
                        break
            return out

    def _vit_forward(self, x: torch.Tensor, levels) -> dict[int, torch.Tensor]:
        deep = sorted(level for level in levels if level > 0)
        maps = self.body.forward_intermediates(
            x, indices=[self.level_block[level] for level in deep], intermediates_only=True, stop_early=True
        )
        out = dict(zip(deep, maps, strict=True))
        if 0 in levels:
            out[0] = self.body.patch_embed(x).permute(0, 3, 1, 2)
        return out

    def run_stage(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """The stage that produces `level`, applied to a map of level `level - 1` (e.g. masked).
        For a ViT: the blocks between the two levels on the patch tokens only (the class/register
        tokens of the full pass are not carried: a documented approximation). In evaluation the
        result is reused for an input seen before (keyed by the input map itself: a support shown
        again with the same mask), as the levels are for an image."""
        if level < 1 or level not in self.levels:
            raise ConfigError(
                f"backbone {self.name!r}: run_stage needs level {level} among the built levels {self.levels}"
            )
        if self.feature_cache is not None and not torch.is_grad_enabled():
            name = ("stage", level)
            compute = lambda maps: {name: self._run_stage(maps, level)}  # noqa: E731
            return self.feature_cache.rows(self, x, [name], compute, self._map_format)[name]
        return self._run_stage(x, level)

    def _run_stage(self, x: torch.Tensor, level: int) -> torch.Tensor:
        caller_grad = torch.is_grad_enabled()
        with self._grad():
            if self.is_vit:
                n, c, h, w = x.shape
                tokens = x.flatten(2).transpose(1, 2)
                for block in self.body.blocks[self.level_block[level - 1] + 1 : self.level_block[level] + 1]:
                    tokens = block(tokens)
                return tokens.transpose(1, 2).reshape(n, c, h, w)
            x = self._format(x)
            order = [name for name, _ in self._ordered_modules()]
            modules = dict(self._ordered_modules())
            prev = self.level_module.get(level - 1)
            if prev is None:  # the previous level is not built: find its module by stage order
                prev = order[order.index(self.level_module[level]) - 1]
            for name in order[order.index(prev) + 1 : order.index(self.level_module[level]) + 1]:
                x = modules[name](x)
            return x.contiguous() if caller_grad else x


# ------------------------------------------------------------------------------------------------
# Per-block ("hyper") features: HSNet / Sym-Net hyper-correlation inputs
# ------------------------------------------------------------------------------------------------


def _final_activation(block: nn.Module) -> nn.Module | None:
    """The activation after a residual block's sum (timm Bottleneck: act3, BasicBlock: act2)."""
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        return block.act3
    if isinstance(block, BasicBlock):
        return block.act2
    return None


class BlockFeatures:
    """Taps every block of some levels of a `Backbone` during its ordinary forward, so the per-block
    maps come from the same pass as the level features: `feats, blocks = BlockFeatures(bb, [2, 3,
    4])(x)`, `blocks[level]` = one map per block of that level's stage, in network order.

    What a "block" output is, per backbone:
    - ResNets (timm Bottleneck / BasicBlock; the PSPNet ResNets too): the **pre-ReLU** sum
      bn3(...) + shortcut (BasicBlock: bn2 + shortcut), taken as the input of the block's last
      activation (a forward hook on the block would only see the post-ReLU output). R50: 3/4/6/3
      maps for levels 1..4, R101: 3/4/23/3 (HSNet, Sym-Net).
    - other timm CNNs (ConvNeXt, ...): the output of every block of the stage (`stage.blocks`, or
      the stage's children when it is a plain Sequential).
    - `vgg16_panet`: the output of every conv of the block, after its ReLU (conv5_3 has none).
    - ViTs: the patch tokens after every transformer block between the previous level and this
      one, as a map on the patch grid (prefix tokens dropped).

    The levels must be among the backbone's built levels. The hooks exist only while this object
    is called (the modules stay hook-free: copies and pickles of the model are unaffected);
    `counts[level]` is the number of maps of each level. Not an nn.Module: it holds no parameters
    and must not register the backbone twice.
    """

    def __init__(self, backbone: Backbone, levels):
        levels = tuple(sorted({int(level) for level in levels}))
        missing = [level for level in levels if level not in backbone.levels]
        if missing:
            raise ConfigError(
                f"backbone {backbone.name!r}: block features of level(s) {missing} need them built: "
                f"built levels {list(backbone.levels)}"
            )
        self.backbone, self.levels = backbone, levels
        self.taps = {level: self._taps(level) for level in levels}
        self.counts = {level: len(taps) for level, taps in self.taps.items()}

    def _taps(self, level: int) -> list[tuple[nn.Module, bool]]:
        """(module, True: record its input / False: its output) for every block of `level`."""
        bb = self.backbone
        if bb.is_vit:
            lo = bb.level_block[level - 1] + 1 if level > 0 else 0
            return [(block, False) for block in bb.body.blocks[lo : bb.level_block[level] + 1]]
        if isinstance(bb.body, PANetVGG16):
            lo = bb.body.ends[level - 1] + 1 if level > 0 else 0
            span = list(bb.body.features)[lo : bb.body.ends[level] + 1]
            return [
                (m, False)
                for i, m in enumerate(span)
                if isinstance(m, nn.ReLU) or (isinstance(m, nn.Conv2d) and i == len(span) - 1)
            ]
        stage = dict(bb._ordered_modules())[bb.level_module[level]]
        blocks = list(getattr(stage, "blocks", stage).children())
        taps = []
        for block in blocks:
            act = _final_activation(block)
            taps.append((act, True) if act is not None else (block, False))
        return taps

    def __call__(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]]]:
        cache = self.backbone.feature_cache
        if cache is None or torch.is_grad_enabled():
            return self._tapped(x)
        # the backbone's cache holds the block maps too (a kept pass runs no module, fires no tap)
        levels = self.backbone.levels
        names = [*levels, *((level, i) for level, n in self.counts.items() for i in range(n))]

        def compute(images):
            feats, blocks = self._tapped(images)
            return {**feats, **{(level, i): m for level, maps in blocks.items() for i, m in enumerate(maps)}}

        maps = cache.rows(self.backbone, x, names, compute, self.backbone._map_format)
        feats = {level: maps[level] for level in levels}
        return feats, {level: [maps[level, i] for i in range(n)] for level, n in self.counts.items()}

    def _tapped(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]]]:
        """One backbone pass (the cache aside) with the block taps."""
        cache, self.backbone.feature_cache = self.backbone.feature_cache, None
        try:
            return self._tap_pass(x)
        finally:
            self.backbone.feature_cache = cache

    def _tap_pass(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]]]:
        blocks: dict[int, list[torch.Tensor]] = {level: [] for level in self.levels}

        def keep_input(level):  # the input of a ResNet block's last ReLU: bn3 + shortcut
            return lambda module, args: blocks[level].append(args[0].clone())  # (the ReLU is in place)

        def keep_output(level):
            return lambda module, args, output: blocks[level].append(output.clone())

        handles = [
            module.register_forward_pre_hook(keep_input(level)) if pre
            else module.register_forward_hook(keep_output(level))
            for level, taps in self.taps.items()
            for module, pre in taps
        ]  # fmt: skip
        try:
            feats = self.backbone(x)
        finally:
            for handle in handles:
                handle.remove()
        if self.backbone.is_vit:  # tokens -> maps on the level features' patch grid
            n, _, h, w = next(iter(feats.values())).shape
            prefix = getattr(self.backbone.body, "num_prefix_tokens", 0)
            blocks = {
                level: [t[:, prefix:].transpose(1, 2).reshape(n, -1, h, w) for t in maps]
                for level, maps in blocks.items()
            }
        return feats, blocks
