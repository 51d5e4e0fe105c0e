"""PSPNet base learner: BAM's stage 1 (chunbolang/BAM `model/PSPNet.py`, `train_base.py`).

Ordinary semantic segmentation of a fold's base classes: backbone -> level-4 features -> pyramid
pooling (bins 1, 2, 3, 6) -> classifier -> logits over background + the fold's base classes (16 on
PASCAL-5i, 61 on COCO-20i), upsampled (bilinear, align_corners=True) to the input size.

    python -m fewshotseg.train method=pspnet_base data=pascal fold=0

trains it (`fewshotseg.lit_semantic.SemanticSegModule`); the checkpoint it writes is what BAM-style
methods (Sym-Net) load with `load_base_learner`: their frozen backbone is this checkpoint's own
(fine-tuned on the base classes), and `base_logits` on the query's level-4 features is the frozen
base learner of their ensemble. BAM's released `initmodel/PSPNet/<dataset>/split<i>/resnet50/best.pth`
files load too (`OFFICIAL_NAMES`, `convert_official_state`).

Class ids of the logits: 0 = background, i = the i-th base class of the fold in ascending class-id
order (BAM's `sub_list.index(c) + 1`); the episodes' `query_base_label` uses the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg.checkpoints import PSP_STEM, RenameTable, mismatch, read, resnet_renames, state_digest
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import Method

# Where the backbone's tensors live in our state dict (the Backbone wraps the timm body).
BACKBONE_PREFIX = "backbone.body."


class PPM(nn.Module):
    """PSPNet's pyramid pooling: per bin, adaptive average pool -> 1x1 conv (no bias) -> BN -> ReLU,
    upsampled back (bilinear, align_corners=True) and concatenated after the input: 2 * in_dim
    channels when reduction_dim = in_dim / len(bins). `features[i]` = (pool, conv, bn, relu) keeps
    the authors' module indices."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(int(b)),
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features]
        return torch.cat([x, *pooled], 1)


# BAM's checkpoints (`model/PSPNet.py`): the backbone as `layer0` (the PSPNet stem Sequential:
# conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool) .. `layer4`, registered a second
# time as `encoder.0` .. `encoder.4`; `ppm` and `cls` as here.
OFFICIAL_NAMES = RenameTable(
    "BAM PSPNet",
    (*resnet_renames(BACKBONE_PREFIX, PSP_STEM), ("ppm.", "ppm."), ("cls.", "cls.")),
    aliases=tuple((f"encoder.{i}.", f"layer{i}.") for i in range(5)),
    unmapped="have no counterpart in PSPNetBase (a ResNet base learner is expected)",
)


class PSPNetBase(Method):
    """The base learner.

    Args:
        backbone: partial of `fewshotseg.backbones.Backbone`, called with `levels` (level 4 always
            included). BAM: the PSPNet deep-stem ResNet-50 (`resnet50_psp`), trained, BN in train mode.
        num_classes: background + the fold's base classes (16 PASCAL-5i, 61 COCO-20i).
        bins: pyramid pooling bins (1, 2, 3, 6).
        levels: backbone levels to build; a method reusing this backbone (Sym-Net) asks for the
            levels it needs, e.g. (2, 3, 4).
        hidden: width of the classifier's 3x3 conv (512).
        dropout: Dropout2d before the last 1x1 conv (0.1).
        backbone_frozen: passed to the backbone partial as `frozen` when not None: false for the
            base stage (BAM fine-tunes layer0-4 with the head), true for a method that keeps the
            loaded base learner fixed; None leaves the backbone config's value.

    Attributes: `backbone`, `ppm`, `cls` (3x3 conv no bias -> BN -> ReLU -> Dropout2d -> 1x1 conv,
    the authors' indices 0..4), `num_classes`.
    """

    task = "semantic"  # a stage: images -> logits over background + the base classes
    official_names = OFFICIAL_NAMES

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        levels: Sequence[int] = (4,),
        hidden: int = 512,
        dropout: float = 0.1,
        backbone_frozen: bool | None = None,
    ):
        super().__init__()
        if num_classes is None or int(num_classes) < 2:
            raise ConfigError(
                f"method.model.num_classes={num_classes}: expected background + the fold's base classes (>= 2)"
            )
        self.num_classes = int(num_classes)
        frozen = {} if backbone_frozen is None else {"frozen": bool(backbone_frozen)}
        self.backbone = backbone(levels=sorted({*levels, 4}), **frozen)
        dim = self.backbone.channels[4]
        if dim % len(bins):
            raise ConfigError(
                f"method.model.bins={list(bins)}: the level-4 width {dim} must divide by their number"
            )
        self.ppm = PPM(dim, dim // len(bins), bins)
        self.cls = nn.Sequential(
            nn.Conv2d(2 * dim, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(hidden, self.num_classes, kernel_size=1),
        )

    def base_logits(self, high: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, h, w] at feature resolution from level-4 features [B, C, h, w]."""
        return self.cls(self.ppm(high.contiguous()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] at the input size."""
        logits = self.base_logits(self.backbone(images)[4])
        return F.interpolate(logits, images.shape[-2:], mode="bilinear", align_corners=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints: ours (Lightning, method=pspnet_base) and the authors' (BAM initmodel/PSPNet)
# ------------------------------------------------------------------------------------------------


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BAM's PSPNet (`OneModel`, ResNet) state dict -> ours (`OFFICIAL_NAMES`). Accepts the `module.`
    prefix (DDP) and a `{'state_dict': ...}` wrapper. Its `encoder.i.*` tensors are the same modules
    as `layer{i}.*` (BAM registers them twice); they are used only where `layer{i}.*` is absent.
    Unmapped keys (e.g. a VGG base learner) raise a ConfigError listing them."""
    return OFFICIAL_NAMES.to_ours(state_dict)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> BAM's PSPNet names, with the `encoder.i.*` duplicates BAM's strict load expects."""
    return OFFICIAL_NAMES.to_official(state_dict)


def _our_state(checkpoint: dict) -> dict[str, torch.Tensor] | None:
    """The PSPNetBase tensors of a `method=pspnet_base` Lightning checkpoint, or None."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not any(k.startswith("method.") for k in state):
        return None
    return {k[len("method.") :]: v for k, v in state.items() if k.startswith("method.")}


def load_base_learner(
    path: str | Path,
    model: PSPNetBase,
    data: str = "<data>",
    fold: int | str = "<fold>",
    command: str | None = None,
) -> PSPNetBase:
    """Load a base learner into `model` (strict) and return it.

    `path`: a `method=pspnet_base` Lightning checkpoint (`.../checkpoints/best-*.ckpt` or `last.ckpt`),
    or BAM's released `initmodel/PSPNet/<dataset>/split<i>/resnet50/best.pth`. `data` and `fold` fill
    in the command named by the errors (or `command`: the one that makes this file); an integer
    `fold` is also checked against the fold our checkpoint was trained on (another fold's base
    learner has seen this fold's novel classes).
    """
    command = command or f"python -m fewshotseg.train method=pspnet_base data={data} fold={fold}"
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"base learner {file}: file not found. Train it first with `{command}` (then give its "
            "checkpoints/best-*.ckpt), or point at BAM's initmodel/PSPNet/<dataset>/split<i>/resnet50/best.pth"
        )
    checkpoint = read(file, "base learner", "file not found")
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"base learner {file}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    trained_fold = (checkpoint.get("fewshotseg_config") or {}).get("fold")
    if isinstance(fold, int) and trained_fold is not None and int(trained_fold) != fold:
        raise ConfigError(
            f"base learner {file} was trained on fold {trained_fold}, this run is fold {fold}: its base "
            f"classes include this fold's novel classes. Train fold {fold}'s with `{command}`"
        )
    state = _our_state(checkpoint)
    if state is None:
        state = convert_official_state(checkpoint)
    missing, unexpected, wrong = (sorted(keys) for keys in mismatch(model.state_dict(), state))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {keys[:8]}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise ConfigError(
            f"base learner {file} does not fit this PSPNetBase ({model.num_classes} classes, backbone "
            f"{getattr(model.backbone, 'name', '?')!r}; made by `{command}` with the same backbone?): {detail}"
        )
    model.load_state_dict(state, strict=False)
    # where these weights started (results.json's backbone_training): our base stage records the file
    # it fine-tuned, one name for every fold's base learner; another file is named by its tensors
    started = checkpoint.get("backbone_start")
    model.backbone.start = (
        f"fine-tuned from {started}"
        if started
        else f"{file.name} (sha256 {state_digest(model.state_dict())})"
    )
    return model
