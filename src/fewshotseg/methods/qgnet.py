"""QGNet (Liu et al., "Few-Shot Segmentation with Global and Local Contrastive Learning", arXiv
2108.05293): PFENet plus a query-only prior region map from a contrastively pre-trained prior
extractor. Follows the official FSS stage (github.com/liuweide01/QGNet-Few-shot-segmentation at
1e77b35, `model/PFENet_QGNet.py`; docs/methods/qgnet.md), 1-way, K-shot.

Per episode, on top of PFENet (methods/pfenet.py):
1. Self-correspondence -> prior region map (query only, no support): the main backbone's query
   layer4 -> `down_learn_super` (3x3 conv -> 256, ReLU, Dropout2d 0.5), the *prior extractor*'s query
   layer4 -> `down_learn_unsuper` (same structure, own weights); per position of the first, the max
   cosine over the positions of the second, min-max per image (eps 1e-7).
2. Cross-correspondence -> guided region map: PFENet's training-free prior.
3. FEM(query, prototype, [guided map, prior region map]): `init_merge` width 256 + 256 + 1 + 1 = 514.

The prior extractor (`prior_extractor` options):
- `name`: its backbone, `resnet50_dilated` (timm/torchvision ResNet-50 with the standard 7x7 stem
  and PSPNet's output-stride-8 dilation), frozen, run under no-grad.
- `init: weights` (default) loads `weights=<file>`:
  - a MoCo checkpoint (`state_dict` with `module.encoder_k.*`): the momentum encoder as the authors'
    code loads it, projection head (`fc`) dropped; `encoder: encoder_q` takes the query encoder;
  - the export of this project's contrastive pre-training (`python -m fewshotseg.pretrain`:
    `{"state_dict": ..., "arch": ...}`, torchvision names, no heads);
  - a torchvision/timm ResNet-50 state dict (`fc` dropped).
  The authors never released their checkpoint (`checkpoint_2000.pth.tar`); a missing file is an
  error naming the stage that produces it.
- `init: supervised_copy`: the main backbone stands in (its query layer4, without gradient; for the
  frozen paper backbone exactly a frozen copy). NOT faithful: the paper's extractor is trained
  without labels. Needs no file and no second backbone pass (the synthetic benchmark's default).
- `init: random`: `name` with random weights (an ablation).
- `init: checkpoint`: built empty for the method's own checkpoint to fill (what `evaluate`/`predict
  ckpt=` use; no file read, no random-weights warning).
- `bn_mode: eval` (default) keeps its BatchNorm statistics fixed. The official code leaves it in
  train mode, so the statistics drift during FSS training: `bn_mode: train` reproduces that. The
  default is a documented deviation (docs/methods/qgnet.md).

Only the self-correspondence map of the released code is implemented (docs/methods/qgnet.md);
the "prior bank" reading of the paper is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.backbones import Backbone
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import Stage
from fewshotseg.methods.pfenet import (
    HEAD_RENAMES,
    PSP_STEM,
    PFENet,
    _raise_unmapped,
    official_required,
)
from fewshotseg.ops.prior import max_cosine_map

PRIOR_EXTRACTOR_DEFAULTS = {
    "name": "resnet50_dilated",
    "init": "weights",
    "weights": None,
    "encoder": "encoder_k",
    "bn_mode": "eval",
}
PRETRAIN_HINT = (
    "it is the prior extractor that the contrastive pre-training stage exports: run "
    "`python -m fewshotseg.pretrain data=<data> fold=<fold>` and give its export (a MoCo checkpoint or a "
    "torchvision/timm ResNet-50 file also loads); or set method.model.prior_extractor.init=supervised_copy "
    "(no file, not faithful)"
)
_KEY = "method.model.prior_extractor"


def _projection(in_ch: int, reduce_dim: int, dropout: float) -> nn.Sequential:
    """`down_learn_super` / `down_learn_unsuper`: 3x3 conv (no bias) -> ReLU -> Dropout2d."""
    return nn.Sequential(
        nn.Conv2d(in_ch, reduce_dim, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p=dropout)
    )


def load_prior_extractor_state(path: str | Path, encoder: str = "encoder_k") -> tuple[dict, str | None]:
    """The ResNet tensors of a prior-extractor file (torchvision names, no `fc`) and the file's `arch`.

    Accepts a MoCo checkpoint (`{"state_dict": {"module.encoder_k.conv1.weight": ...}, "arch": ...}`:
    the `encoder` is taken, its heads dropped, as the authors' `load_resnet50_param` does), this
    project's pre-training export (`{"state_dict": {"conv1.weight": ...}, "arch": ...}`) or a plain
    torchvision/timm ResNet state dict (.pth or .safetensors)."""
    ckpt = checkpoints.read(path, f"{_KEY}.weights", f"file not found: {PRETRAIN_HINT}")
    arch = ckpt.get("arch") if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), str) else None
    ckpt = checkpoints.unwrap(ckpt, ("state_dict", "model"))
    state = checkpoints.strip_prefix({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})
    state = checkpoints.package_backbone_state(state) or state  # this package's own checkpoints
    if any(k.startswith(("encoder_q.", "encoder_k.")) for k in state):  # MoCo: pick one encoder
        if encoder not in ("encoder_k", "encoder_q"):
            raise ConfigError(f"{_KEY}.encoder={encoder!r}: expected 'encoder_k' (official) or 'encoder_q'")
        state = {k[len(encoder) + 1 :]: v for k, v in state.items() if k.startswith(encoder + ".")}
    heads = ("fc.", "head.", "heads.", "local_head.", "global_head.", "queue")
    return {k: v for k, v in state.items() if not k.startswith(heads)}, arch


# The authors' checkpoints (`model/PFENet_QGNet.py`): PFENet's names (`layer0..4`, the FEM parts,
# the heads), the prior extractor as `layer0_unsuper` (its standard stem Sequential: conv1, bn1,
# relu, maxpool) .. `layer4_unsuper`, and the two self-correspondence heads.
TV_STEM = {"0": "conv1", "1": "bn1"}
QG_HEADS = ("down_learn_super", "down_learn_unsuper")
OFFICIAL_NAMES = checkpoints.RenameTable(
    "QGNet",
    (
        *checkpoints.resnet_renames("backbone.body.", PSP_STEM),
        *checkpoints.resnet_renames("prior_extractor.body.", TV_STEM, suffix="_unsuper"),
        *HEAD_RENAMES,
        *((f"{h}.", f"{h}.") for h in QG_HEADS),
    ),
)


class QGNet(PFENet):
    """QGNet (FSS stage).

    Args: as :class:`PFENet`, plus
        prior_extractor: options of the prior extractor (see the module docstring): `name`,
            `init` (weights | supervised_copy | random | checkpoint), `weights`, `encoder`, `bn_mode`.
    """

    official_names = OFFICIAL_NAMES
    # the prior extractor: the export of `python -m fewshotseg.pretrain`
    stages = (
        Stage(
            module="prior_extractor",
            restore={"prior_extractor.init": "checkpoint"},
            produced_by="fewshotseg.pretrain",
            load={
                "prior_extractor.init": "weights",
                "prior_extractor.weights": "{path}",
                "prior_extractor.name": "{arch}",
            },
        ),
    )
    extra_maps = 1  # the prior region map

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        prior_extractor: Mapping | None = None,
        mid_levels: Sequence[int] = (3, 2),
        high_level: int = 4,
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        dropout: float = 0.5,
    ):
        super().__init__(backbone, mid_levels, high_level, reduce_dim, bins, dropout)
        opts = dict(prior_extractor or {})
        unknown = sorted(set(opts) - set(PRIOR_EXTRACTOR_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"{_KEY}: unknown option(s) {unknown}; expected {sorted(PRIOR_EXTRACTOR_DEFAULTS)}"
            )
        opts = {**PRIOR_EXTRACTOR_DEFAULTS, **opts}
        self.prior_init = opts["init"]
        if self.prior_init not in ("weights", "supervised_copy", "random", "checkpoint"):
            raise ConfigError(
                f"{_KEY}.init={self.prior_init!r}: expected 'weights', 'supervised_copy', 'random' or 'checkpoint'"
            )
        if self.prior_init == "supervised_copy":
            self.prior_extractor = None  # the main backbone's query features stand in
            extractor_channels = self.backbone.channels[self.high_level]
        else:
            if self.prior_init == "weights" and not opts["weights"]:
                raise ConfigError(f"{_KEY}.weights is not set: {PRETRAIN_HINT}")
            state = arch = None
            if self.prior_init == "weights":  # read the file first: a missing file fails fast
                state, arch = load_prior_extractor_state(opts["weights"], opts["encoder"])
            # Frozen only once its weights are in (a file, or the method's checkpoint after
            # construction), so that Backbone warns of random frozen weights for init=random only.
            random_weights = self.prior_init == "random"
            self.prior_extractor = Backbone(
                name=opts["name"],
                levels=[self.high_level],
                output_stride=8,
                frozen=random_weights,
                bn_mode=opts["bn_mode"],
            )
            if state is not None:
                self._load_extractor(state, arch, str(opts["weights"]), opts["name"])
            if not random_weights:
                self.prior_extractor.frozen = True
                self.prior_extractor.requires_grad_(False)
            extractor_channels = self.prior_extractor.channels[self.high_level]
        high_channels = self.backbone.channels[self.high_level]
        self.down_learn_super = _projection(high_channels, reduce_dim, dropout)
        self.down_learn_unsuper = _projection(extractor_channels, reduce_dim, dropout)

    def _load_extractor(self, state: dict, arch: str | None, source: str, name: str) -> None:
        """Every tensor of the extractor must come from the file, with its shape (strict)."""
        missing, extra, wrong = checkpoints.mismatch(self.prior_extractor.body.state_dict(), state)
        if missing or extra or wrong:
            raise ConfigError(
                f"{_KEY}.weights={source}: does not fit prior extractor {name!r}"
                + (f" (the file says arch={arch!r}; set {_KEY}.name)" if arch and arch != name else "")
                + f": missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"
            )
        self.prior_extractor.body.load_state_dict(state, strict=False)

    def prior_features(self, query: torch.Tensor, q_feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """The prior extractor's query map at the high level, without gradient."""
        if self.prior_extractor is None:
            return q_feats[self.high_level].detach()
        with torch.no_grad():
            return self.prior_extractor(query)[self.high_level]

    def extra_query_maps(
        self, q_feats: dict[int, torch.Tensor], query: torch.Tensor, size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """The prior region map R_p [B,1,*size]: min-max(max_j cos(A_i, U_j)) (self-correspondence),
        resized to the mid features (official: to query layer3's size, the same at OS 8)."""
        a = self.down_learn_super(q_feats[self.high_level])
        u = self.down_learn_unsuper(self.prior_features(query, q_feats))
        region = max_cosine_map(a, u)
        return [F.interpolate(region, size=tuple(size), mode="bilinear", align_corners=True)]


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' QGNet state dict (`model/PFENet_QGNet.py`; with or without `module.`) -> this
    module's names (`OFFICIAL_NAMES`), after checking that every tensor of that layout is there.
    Unmapped or missing keys raise ConfigError. (For a model built with
    `prior_extractor.init=supervised_copy`, drop the `prior_extractor.` keys.)"""
    state = checkpoints.strip_prefix(state_dict)
    backbones = [
        ("resnet50_psp", "backbone.body."),
        ("resnet50_dilated", "prior_extractor.body."),
    ]  # ResNet-50 only
    missing = official_required(state, backbones, OFFICIAL_NAMES)
    missing += [f"{h}.0.weight" for h in QG_HEADS if f"{h}.0.weight" not in state]
    _raise_unmapped("QGNet convert_official_state", missing, "(missing from the checkpoint)")
    return OFFICIAL_NAMES.to_ours(state)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_official_state`: this module's state dict -> the authors' names."""
    return OFFICIAL_NAMES.to_official(state_dict)
