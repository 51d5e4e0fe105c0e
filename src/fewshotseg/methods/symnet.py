"""Sym-Net (Li, Sun, Xiao, Qi, Bhanu; arXiv 2407.19306): symmetrical support-query prototypes with
a self-activation prior, built on BAM. Follows the official code (Sunbaoquan/Sym-Net @ 448f312,
`model/SymNet.py`; docs/methods/symnet.md), 1-way, K-shot.

Per episode:
1. Query and supports -> the frozen backbone of the fold's **base learner** (BAM stage 1,
   `method=pspnet_base`; BN in eval mode), one pass each giving the levels 2, 3, 4 and the
   pre-ReLU output of every block of levels 2-4 (`BlockFeatures`, the HSNet hyper features).
   Mid features fuse_levels(3, 2) -> `down_query` / `down_supp`.
2. K-shot weights omega (BAM): Gram discrepancy est_k = |G(Q2) - G(S2_k)|_F / C of the level-2
   maps; K > 1: sorted est -> `kshot_rw` (1x1 K->2->K) -> un-sorted -> softmax. omega = 1 for K = 1.
3. SPM (parameter-free): for windows 5x5, 7x1, 1x7, average-pooled query / masked support level-4
   maps, the self-activation kernel <q, s> / (|q||s| + eps) * |q| averaged over all support
   positions, min-max per image; mean over windows, sum over shots with omega -> prior p.
4. TDC: per hyper layer, mean over the support foreground of ReLU(cos(q, s)), averaged over shots,
   stacked per stage -> top-down 1x1 / 3x3 convs with GroupNorm -> 48 maps.
5. APA (one module for both sides): prototype + class-name embedding as the query token of a
   bilinear cross-attention over the (masked) mid features, residual on the prototype. Support:
   MAP prototype over F_s * M_s, aggregated over shots with omega. Query: the prototype of the
   confident region (p > 0.7) over F_q * p. Hybrid prototype = 0.5 (query + support).
6. Meta learner: FEM(F_q, hybrid prototype, [TDC, p]) (561 input channels).
7. BAM ensemble: `gram_merge` (2->1, init [1, 0]) on [meta_bg, est] and [meta_fg, est];
   `cls_merge` (init [1, 0]) on [meta_bg', base_fg] where base_fg = the base learner's foreground
   probability (in training without the episode's own class); final = [bg, meta_fg'] (probabilities
   used as logits, as BAM).
8. Training losses: CE(final) (lit) + `meta` CE(meta) + `base` CE(base, query_base_label) (no
   trainable part behind it: logged) + `aux` FEM inner CE + `triplet` (co-optimised hard triplet
   loss on the support and query APA prototypes, margin 0.5). In evaluation the meta logits go out
   as `ExtraLogits({"meta": ...})` (methods/base.py), scored as `meta_miou`.

`base_learner=null` is the documented ablation: the configured backbone (its own weights) and no
base learner (base_fg = 0, so `cls_merge` sees only the meta background).

Deviations: the class-name table defaults to all-MiniLM-L6-v2 (384-d) instead of the unshipped
word2vec (300-d); give the official `word2vec_{pascal,coco}.pkl` as `text_table` for the paper's.
Batched over the batch and the shots (the official code loops over images for the correlations,
the region aggregation and the triplet loss: same sums, in another order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg import checkpoints
from fewshotseg.backbones import BlockFeatures, fuse_levels
from fewshotseg.data.episode import IGNORE_INDEX, Episode
from fewshotseg.errors import ConfigError
from fewshotseg.methods import pspnet_base
from fewshotseg.methods.base import ExtraLogits, Method, Stage
from fewshotseg.modules.fem import FEM, inner_loss, upsample_logits
from fewshotseg.modules.projection import mid_projection
from fewshotseg.ops.correlation import hyper_correlation
from fewshotseg.ops.prototypes import weighted_gap
from fewshotseg.ops.text import ENCODER
from fewshotseg.ops.text import text_table as build_text_table

MID_LEVELS = (3, 2)  # cat(layer3, layer2)
HIGH_LEVEL = 4  # SPM and the base learner
GRAM_LEVEL = 2  # BAM's low_fea
HYPER_LEVELS = (2, 3, 4)  # TDC (layer1's blocks are extracted but unused by the official code)
EPS = 1e-7
BASE_LEARNER_REQUIRED = "REQUIRED"
# The base learner's weights come with the model's state dict (a Sym-Net run checkpoint that
# `evaluate ckpt=` / `predict ckpt=` load): build its modules, read no file.
BASE_LEARNER_IN_STATE_DICT = "in_state_dict"


# ------------------------------------------------------------------------------------------------
# Parameter-free parts
# ------------------------------------------------------------------------------------------------


def self_activation_prior(
    query: torch.Tensor, support: torch.Tensor, windows: Sequence[Sequence[int]] = ((5, 5), (7, 1), (1, 7))
) -> torch.Tensor:
    """SPM for one shot: query [B,C,h,w], masked support [B,C,h,w] -> [B,1,h,w] in [0, 1].

    Per window: a(i,j) = <q_i, s_j> / (|q_i||s_j| + eps) * |q_i| on the average-pooled maps (stride
    1, zero padding counted), averaged over every support position j (background ones are zero and
    count), min-max per image; then the mean over the windows."""
    B, C, h, w = query.shape
    maps = []
    for kh, kw in windows:
        pool = dict(kernel_size=(kh, kw), stride=1, padding=(kh // 2, kw // 2))
        s = F.avg_pool2d(support, **pool).reshape(B, C, -1)
        q = F.avg_pool2d(query, **pool).reshape(B, C, -1).transpose(1, 2)  # [B, hw, C]
        s_norm = torch.linalg.vector_norm(s, dim=1, keepdim=True)  # [B, 1, hw]
        q_norm = torch.linalg.vector_norm(q, dim=2, keepdim=True)  # [B, hw, 1]
        sim = torch.bmm(q, s) / (torch.bmm(q_norm, s_norm) + EPS) * q_norm
        sim = sim.mean(2)
        lo, hi = sim.min(1, keepdim=True)[0], sim.max(1, keepdim=True)[0]
        maps.append(((sim - lo) / (hi - lo + EPS)).view(B, 1, h, w))
    return torch.cat(maps, 1).mean(1, keepdim=True)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Cosine Gram matrix of the channels: [B,C,h,w] -> [B,C,C]."""
    f = feat.reshape(feat.shape[0], feat.shape[1], -1)
    norm = torch.linalg.vector_norm(f, dim=2, keepdim=True)  # [B, C, 1]
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + EPS)


def gram_discrepancy(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """BAM's est = |G(q) - G(s)|_F / |ones(C, C)|_F: query [B,C,h,w], support [B,K,C,h,w] -> [B,K]."""
    B, K = support.shape[:2]
    q_gram = gram_matrix(query)
    s_gram = gram_matrix(support.flatten(0, 1)).view(B, K, *q_gram.shape[1:])
    return torch.linalg.matrix_norm(q_gram[:, None] - s_gram) / q_gram.shape[-1]


def region_prototypes(
    feat: torch.Tensor,
    prior: torch.Tensor,
    fg_thr: float = 0.7,
    hard_range: Sequence[float] = (0.4, 0.55),
    bg_thr: float = 0.4,
    fallback_k: int = 12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query region aggregation (not learned): feat [B,C,h,w], prior [B,1,h,w] -> the foreground
    (p > fg_thr), hard (hard_range open interval) and background (p < bg_thr) prototypes [B,C].
    An empty region falls back to the fallback_k positions with the highest p / around the median
    of the sorted p / with the lowest p."""
    B, C = feat.shape[:2]
    f = feat.reshape(B, C, -1)
    p = prior.reshape(B, -1)
    n = p.shape[1]
    half = fallback_k // 2

    def pool(region: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        chosen = torch.zeros_like(p).scatter_(1, fallback, 1.0)
        w = torch.where(region.any(1, keepdim=True), region.to(p.dtype), chosen)
        return torch.bmm(f, w[:, :, None]).squeeze(2) / w.sum(1, keepdim=True)

    fg = pool(p > fg_thr, p.topk(fallback_k, 1).indices)
    hard = pool(
        (p > hard_range[0]) & (p < hard_range[1]), p.sort(1).indices[:, n // 2 - half : n // 2 + half]
    )
    bg = pool(p < bg_thr, (1 - p).topk(fallback_k, 1).indices)
    return fg, hard, bg


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a/|a| - b/|b||, F.pairwise_distance's eps included (the official triplet distance)."""
    return F.pairwise_distance(F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def triplet_loss(
    support_proto: torch.Tensor,
    support_feat: torch.Tensor,
    support_mask: torch.Tensor,
    query_proto: torch.Tensor,
    query_hard: torch.Tensor,
    query_bg: torch.Tensor,
    margin: float = 0.5,
) -> torch.Tensor:
    """Sym-Net's co-optimised hard triplet loss (docs/methods/symnet.md).

    support_proto [B,C] (the omega-aggregated support APA prototype), support_feat [B,K,C,h,w],
    support_mask [B,K,H,W] float (1 = foreground; nearest-resized to h x w); query_proto, query_hard,
    query_bg [B,C]. Support term, per shot and image: max(0, m + max over foreground pixels of
    d(anchor, pixel) - d(anchor, mean of the unit background pixels)), averaged over the images
    with both foreground and background, then over shots. Query term: max(0, m + d(q, hard) -
    d(q, bg)), averaged over the batch. Returns their sum (a scalar)."""
    B, K, C, h, w = support_feat.shape
    mask = F.interpolate(support_mask.flatten(0, 1)[:, None].float(), size=(h, w), mode="nearest")
    mask = mask.long().view(B, K, h * w)
    feats = support_feat.reshape(B, K, C, h * w).transpose(2, 3)  # [B, K, hw, C]
    anchor = F.normalize(support_proto, dim=-1)[:, None, None]  # [B, 1, 1, C]
    d_pos = torch.linalg.vector_norm(anchor - F.normalize(feats, dim=-1) + 1e-6, dim=-1)  # [B, K, hw]
    pos, neg = (mask == 1), (mask == 0)
    hardest = d_pos.masked_fill(~pos, 0.0).max(2)[0]  # distances are >= 0: the fill never wins
    neg_mean = (F.normalize(feats, dim=-1) * neg[..., None]).sum(2) / neg.sum(2, keepdim=True).clamp(min=1)
    d_neg = torch.linalg.vector_norm(anchor[:, :, 0] - neg_mean + 1e-6, dim=-1)  # mean not re-normalised
    valid = pos.any(2) & neg.any(2)
    per_image = torch.where(valid, F.relu(margin + hardest - d_neg), torch.zeros_like(d_neg))
    support_term = (per_image.sum(0) / valid.sum(0).clamp(min=1)).mean()
    query_term = F.relu(margin + _distance(query_proto, query_hard) - _distance(query_proto, query_bg)).mean()
    return support_term + query_term


# ------------------------------------------------------------------------------------------------
# Learned parts
# ------------------------------------------------------------------------------------------------


class APA(nn.Module):
    """Visual-text alignment prototype aggregation: z = W_q [text; v]; keys (= values) K = W_k X;
    attention softmax_i(z A K_i^T) (bilinear score, A ~ U(-1/sqrt(d), 1/sqrt(d))); out =
    Dropout(proj(sum_i a_i K_i)) + v. One module serves the support and the query side."""

    def __init__(self, text_dim: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.w_q = nn.Linear(text_dim + dim, dim, bias=False)
        self.w_k = nn.Conv2d(dim, dim, 1, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(dim, dim))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, text: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        """x [B,dim,h,w], text [B,text_dim], proto [B,dim] -> [B,dim]."""
        B = x.shape[0]
        keys = self.w_k(x).reshape(B, self.dim, -1).transpose(1, 2)  # [B, hw, dim]
        z = self.w_q(torch.cat([text, proto], 1))[:, None]  # [B, 1, dim]
        score = torch.bmm(z @ self.weight, keys.transpose(1, 2)).softmax(-1)  # [B, 1, hw]
        return self.dropout(self.proj(torch.bmm(score, keys)))[:, 0] + proto


class TDC(nn.Module):
    """Top-down hyper-correlation: per stage a 1x1 conv (bias) to `hidden`, then
    u = merge1(c3 + c4) and out = merge2(u + c2) (3x3 convs, GroupNorm(1), ReLU) -> `out` maps."""

    def __init__(self, counts: Sequence[int], hidden: int = 16, out: int = 48):
        super().__init__()
        n2, n3, n4 = counts
        self.proj4 = nn.Conv2d(n4, hidden, 1)
        self.proj3 = nn.Conv2d(n3, hidden, 1)
        self.proj2 = nn.Conv2d(n2, hidden, 1)
        self.merge1 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(1, hidden), nn.ReLU(inplace=True)
        )
        self.merge2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(1, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out, 3, padding=1),
        )  # fmt: skip

    def forward(self, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        u = self.merge1(self.proj3(c3) + self.proj4(c4))
        return self.merge2(u + self.proj2(c2))


def _merge_conv() -> nn.Conv2d:
    """BAM's 2 -> 1 merge, initialised to pass its first input through ([1, 0])."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    return conv


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean CE ignoring 255 (0 rather than NaN when everything is ignored)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp(min=1)


# The authors' checkpoints (`model/SymNet.py`): the base learner's backbone as BAM's `layer0` (the
# PSPNet stem Sequential) .. `layer4` and its PPM + classifier as `learner_base.0` / `.1` (as here),
# the TDC as `hyper_final`, APA as `CrossAttention`, the FEM parts at the top level.
OFFICIAL_NAMES = checkpoints.RenameTable(
    "Sym-Net",
    (
        *checkpoints.resnet_renames(pspnet_base.BACKBONE_PREFIX, checkpoints.PSP_STEM),
        ("learner_base.0.", "learner_base.0."),
        ("learner_base.1.", "learner_base.1."),
        ("hyper_final.conv1.", "tdc.proj4."),
        ("hyper_final.conv2.", "tdc.proj3."),
        ("hyper_final.conv3.", "tdc.proj2."),
        ("hyper_final.merge1.", "tdc.merge1."),
        ("hyper_final.merge2.", "tdc.merge2."),
        ("CrossAttention.", "apa."),
        *(
            (f"{name}.", f"fem.{name}.")
            for name in ("init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
        ),
        ("down_query.", "down_query."),
        ("down_supp.", "down_supp."),
        ("gram_merge.", "gram_merge."),
        ("cls_merge.", "cls_merge."),
        ("kshot_rw.", "kshot_rw."),
    ),
)


class SymNet(Method):
    """Sym-Net.

    Args:
        backbone: partial of `fewshotseg.backbones.Backbone` (the base learner's architecture:
            `resnet50_psp`). Levels 2, 3, 4 are built and the blocks of levels 2-4 tapped.
        base_learner: the fold's base learner checkpoint (`method=pspnet_base`, or BAM's
            `initmodel/PSPNet/<dataset>/split<i>/resnet50/best.pth`): its backbone replaces the
            configured weights and its PPM + classifier are the frozen base learner. null: no base
            learner (ablation; the configured backbone weights). `BASE_LEARNER_IN_STATE_DICT`:
            the same modules, their weights loaded afterwards from a Sym-Net checkpoint.
        base_learner_from: the command that makes the base learner file, named when it is missing
            (null: `train method=pspnet_base` with this run's data and fold).
        shot: K (builds `kshot_rw` for K > 1).
        class_names: the dataset's class names (id order) for the text table and the base classes;
            null: from `data_source(root=data_root)`.
        base_classes: the fold's base class ids; null: from the source's fold split.
        data_source, data_root, fold, num_folds, fold_split: the data config (interpolated).
        text_table: a [C + 1, d] file (.npy, .pt, or the official word2vec .pkl); null: the class
            names encoded with all-MiniLM-L6-v2 (384-d, cached next to the data).
        text_dim: the expected width (null: the table's).
        text_prompt: template for the encoded names ("{}"; e.g. "a photo of a {}").
        reduce_dim, bins: FEM width and bins (PASCAL [60, 30, 15, 8], COCO [81, 40, 20, 10]).
        windows: SPM windows. fg_thr, hard_range, bg_thr, fallback_k: query region aggregation.
        margin: triplet margin. apa_dropout, tdc_hidden, tdc_out, hybrid_alpha, kshot_hidden,
        dropout (of the projections): as the official code.
        freeze_backbone: True: no gradient, BN in eval mode (BAM's fix_bn); False: as the backbone
            config says; None: True with a base learner (official), else the backbone config's.
    """

    reads_class_names = True  # the class-name embedding: `predict` asks for class_name=
    official_names = OFFICIAL_NAMES
    # the fold's base learner: a `method=pspnet_base` checkpoint (or BAM's released best.pth)
    stages = (
        Stage(
            module="learner_base",
            restore={"base_learner": BASE_LEARNER_IN_STATE_DICT},
            produced_by="fewshotseg.train",
            load={"base_learner": "{path}"},
        ),
    )

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        base_learner: str | None = BASE_LEARNER_REQUIRED,
        shot: int = 1,
        class_names: Sequence[str] | None = None,
        base_classes: Sequence[int] | None = None,
        data_source: Callable | None = None,
        data_root: str | None = None,
        fold: int = 0,
        num_folds: int = 4,
        fold_split: str = "consecutive",
        text_table: str | None = None,
        text_dim: int | None = None,
        text_prompt: str = "{}",
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        windows: Sequence[Sequence[int]] = ((5, 5), (7, 1), (1, 7)),
        fg_thr: float = 0.7,
        hard_range: Sequence[float] = (0.4, 0.55),
        bg_thr: float = 0.4,
        fallback_k: int = 12,
        margin: float = 0.5,
        apa_dropout: float = 0.1,
        tdc_hidden: int = 16,
        tdc_out: int = 48,
        hybrid_alpha: float = 0.5,
        kshot_hidden: int = 2,
        dropout: float = 0.5,
        freeze_backbone: bool | None = None,
        base_learner_from: str | None = None,
    ):
        super().__init__()
        source = data_source(root=data_root) if data_source is not None and data_root is not None else None
        data_name = source.name if source is not None else "<data>"
        command = (
            base_learner_from or f"python -m fewshotseg.train method=pspnet_base data={data_name} fold={fold}"
        )
        if base_learner == BASE_LEARNER_REQUIRED:
            raise ConfigError(
                "method.model.base_learner: Sym-Net needs the fold's base learner (BAM stage 1). Train it "
                f"with `{command}` and give method.model.base_learner=<its checkpoints/best-*.ckpt> (or "
                "BAM's initmodel/PSPNet/<dataset>/split<i>/resnet50/best.pth); method.model.base_learner=null "
                "runs without it (an ablation)"
            )
        self.shot = int(shot)
        if source is None and (class_names is None or base_classes is None):
            raise ConfigError("SymNet: give class_names and base_classes, or data_source and data_root")
        names = list(class_names) if class_names is not None else list(source.class_names)
        if base_classes is None:
            base_classes = source.class_split(fold, num_folds, fold_split).train
        self.base_classes = sorted(int(c) for c in base_classes)
        # class id -> base-learner class (BAM's sub_list.index(c) + 1; 0 for the novel classes)
        base_index = torch.zeros(len(names) + 1, dtype=torch.long)
        base_index[self.base_classes] = torch.arange(1, len(self.base_classes) + 1)
        self.register_buffer("base_index", base_index, persistent=False)

        cache = source.cache_dir() if source is not None and source.root.is_dir() else None
        table = build_text_table(names, text_table, text_dim, cache, text_prompt)
        self.register_buffer("text_table", table, persistent=False)  # rebuilt from the config, never per step
        self.text_dim = table.shape[1]
        self.class_name_table = Path(text_table).name if text_table else ENCODER  # recorded in results.json

        if freeze_backbone is None:  # BAM: the base learner's backbone is frozen, BN in eval mode
            freeze_backbone = base_learner is not None
        levels = sorted({*MID_LEVELS, HIGH_LEVEL, GRAM_LEVEL})
        if freeze_backbone:  # frozen once the base learner's weights are in (not "frozen random")
            self.backbone = backbone(levels=levels, frozen=base_learner is None, bn_mode="eval")
        else:
            self.backbone = backbone(levels=levels)
        self.learner_base: nn.Sequential | None = None
        if base_learner is not None:
            base = pspnet_base.PSPNetBase(
                lambda levels: self.backbone, num_classes=len(self.base_classes) + 1
            )
            if base_learner == BASE_LEARNER_IN_STATE_DICT:
                self.backbone.start = "the fold's base learner"  # recorded with results (results.json)
            else:  # and which one: what it was fine-tuned from (or the file's digest)
                pspnet_base.load_base_learner(base_learner, base, fold=fold, command=command)
                self.backbone.start = f"the fold's base learner ({self.backbone.start})"
            self.learner_base = nn.Sequential(base.ppm, base.cls).requires_grad_(False)  # BAM's names
        if freeze_backbone and not self.backbone.frozen:
            self.backbone.frozen = True
            self.backbone.body.requires_grad_(False)
        self.blocks = BlockFeatures(self.backbone, HYPER_LEVELS)

        mid_ch = sum(self.backbone.channels[level] for level in MID_LEVELS)
        self.down_query = mid_projection(mid_ch, reduce_dim, dropout)
        self.down_supp = mid_projection(mid_ch, reduce_dim, dropout)
        self.tdc = TDC([self.blocks.counts[level] for level in HYPER_LEVELS], tdc_hidden, tdc_out)
        self.apa = APA(self.text_dim, reduce_dim, apa_dropout)
        self.fem = FEM(2 * reduce_dim + tdc_out + 1, bins=bins, reduce_dim=reduce_dim)
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()
        if self.shot > 1:
            self.kshot_rw = nn.Sequential(
                nn.Conv2d(self.shot, kshot_hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(kshot_hidden, self.shot, 1),
            )
        self.windows = [tuple(int(v) for v in w) for w in windows]
        self.region = dict(fg_thr=fg_thr, hard_range=tuple(hard_range), bg_thr=bg_thr, fallback_k=fallback_k)
        self.margin, self.hybrid_alpha = margin, hybrid_alpha
        # fix_bn from construction: Lightning does not call .train() before fitting, and restores
        # each module's mode after validation, so the override below alone left the base learner's
        # BN statistics updating during training
        self.train(self.training)

    def train(self, mode: bool = True) -> SymNet:
        super().train(mode)
        if self.learner_base is not None:  # BAM's fix_bn: every BatchNorm in eval mode (dropout stays)
            for m in self.learner_base.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # --- pieces ----------------------------------------------------------------------------------
    def features(self, images: torch.Tensor):
        """One backbone pass: level maps and the per-block (pre-ReLU) maps of levels 2-4."""
        return self.blocks(images)

    def shot_weights(self, est: torch.Tensor) -> torch.Tensor:
        """omega [B,K] from the Gram discrepancies est [B,K] (ones for K = 1)."""
        if est.shape[1] == 1:
            return torch.ones_like(est)
        if est.shape[1] != self.shot:
            raise ConfigError(
                f"SymNet was built for shot={self.shot}, got an episode with {est.shape[1]} shots"
            )
        val, idx = est.sort(1)
        weight = self.kshot_rw(val[:, :, None, None])[:, :, 0, 0]
        return weight.gather(1, idx.argsort(1)).softmax(1)

    def base_foreground(self, base_prob: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        """Sum of the base learner's class probabilities [B,1,h,w]; in training without the
        episode's own class (BAM)."""
        keep = torch.ones(base_prob.shape[:2], dtype=base_prob.dtype, device=base_prob.device)
        if self.training:  # (a novel class maps to 0, the background: nothing more is dropped)
            own = self.base_index.to(class_id.device)[class_id]
            keep[torch.arange(len(own), device=keep.device), own] = 0
        keep[:, 0] = 0
        return (base_prob * keep[:, :, None, None]).sum(1, keepdim=True)

    def ensemble(self, meta: torch.Tensor, est: torch.Tensor, base_fg: torch.Tensor) -> torch.Tensor:
        """BAM: meta logits [B,2,h,w], Gram discrepancy est [B], base foreground [B,1,h,w] ->
        [B,2,h,w] probabilities (used as logits). With both merges at [1, 0]: softmax(meta)."""
        prob = meta.softmax(1)
        est_map = est.view(-1, 1, 1, 1).expand_as(prob[:, :1])
        meta_bg = self.gram_merge(torch.cat([prob[:, :1], est_map], 1))
        meta_fg = self.gram_merge(torch.cat([prob[:, 1:], est_map], 1))
        return torch.cat([self.cls_merge(torch.cat([meta_bg, base_fg], 1)), meta_fg], 1)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor] | ExtraLogits]:
        query, supports, s_labels = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, K = supports.shape[:2]
        text = self.text_table[batch["class_id"]].to(query.dtype)  # [B, d]

        q_feats, q_blocks = self.features(query)
        q_mid = self.down_query(fuse_levels(q_feats, MID_LEVELS))
        s_feats, s_blocks = self.features(supports.flatten(0, 1))
        s_mid = self.down_supp(fuse_levels(s_feats, MID_LEVELS))  # [BK, 256, h, w]
        h, w = s_mid.shape[-2:]
        masks = (s_labels == 1).to(query.dtype).flatten(0, 1)[:, None]  # [BK, 1, H, W]
        mask_down = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=True)

        # support prototypes through APA (with the class name), one per shot
        s_proto = weighted_gap(s_mid, mask_down)
        s_apa = self.apa(s_mid * mask_down, text.repeat_interleave(K, 0), s_proto).view(B, K, -1)

        # hyper-correlation per stage, averaged over shots (one shot at a time: [B, hw, hw] each)
        shot_masks = masks.view(B, K, *masks.shape[1:])
        stages = []
        for level in HYPER_LEVELS:
            s_maps = [m.view(B, K, *m.shape[1:]) for m in s_blocks[level]]
            corr = [
                hyper_correlation(q_blocks[level], [m[:, k] for m in s_maps], shot_masks[:, k])
                for k in range(K)
            ]
            stages.append(torch.stack(corr, 1).mean(1))
        tdc = self.tdc(*stages)

        # K-shot weights from the Gram discrepancy of level 2
        s_low = s_feats[GRAM_LEVEL].reshape(B, K, *s_feats[GRAM_LEVEL].shape[1:])
        est_k = gram_discrepancy(q_feats[GRAM_LEVEL], s_low)
        omega = self.shot_weights(est_k)  # [B, K]
        est = (omega * est_k).sum(1)  # [B]

        # SPM prior from level 4 (unmasked support pass, masked afterwards)
        q_high = q_feats[HIGH_LEVEL]
        s_high = s_feats[HIGH_LEVEL]
        mask_high = F.interpolate(masks, size=s_high.shape[-2:], mode="bilinear", align_corners=True)
        s_high = (s_high * mask_high).view(B, K, *s_high.shape[1:])
        priors = torch.cat([self_activation_prior(q_high, s_high[:, k], self.windows) for k in range(K)], 1)
        prior = (omega[:, :, None, None] * priors).sum(1, keepdim=True)  # [B, 1, h, w]

        # query side: region prototypes, APA on the prior-weighted features; hybrid prototype
        s_apa = (omega[:, :, None] * s_apa).sum(1)
        fg, hard, bg = region_prototypes(q_mid, prior, **self.region)
        q_apa = self.apa(q_mid * prior, text, fg)
        hybrid = self.hybrid_alpha * q_apa + (1 - self.hybrid_alpha) * s_apa

        meta, inner = self.fem(q_mid, vectors=hybrid, maps=torch.cat([tdc, prior], 1))

        # BAM's ensemble with the frozen base learner
        base = None
        if self.learner_base is not None:
            base = self.learner_base(q_high.contiguous())
            base_fg = self.base_foreground(base.softmax(1), batch["class_id"])
        else:
            base_fg = torch.zeros_like(meta[:, :1])
        final = self.ensemble(meta, est, base_fg)

        size = query.shape[-2:]
        logits, meta = upsample_logits(final, size), upsample_logits(meta, size)
        aux: dict[str, torch.Tensor] = {}
        if self.training and "query_mask" in batch:
            target = batch["query_mask"]
            aux["meta"] = _ce(meta, target)
            aux["aux"] = inner_loss(inner, target)
            if base is not None and "query_base_label" in batch:
                aux["base"] = _ce(upsample_logits(base, size), batch["query_base_label"]).detach()
            s_mid_k = s_mid.view(B, K, *s_mid.shape[1:])
            aux["triplet"] = triplet_loss(s_apa, s_mid_k, shot_masks[:, :, 0], q_apa, hard, bg, self.margin)
        elif not self.training:
            return logits, ExtraLogits({"meta": meta})
        return logits, aux


# ------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ------------------------------------------------------------------------------------------------


def convert_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official SymNet state dict (train_epoch_*.pth; `module.` prefix and a `state_dict`
    wrapper accepted) -> ours (`OFFICIAL_NAMES`). The text table is not part of it (the official
    code reads embeddings/*.pkl; give it as method.model.text_table)."""
    return OFFICIAL_NAMES.to_ours(state_dict)


def to_official_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the official SymNet names (the inverse of :func:`convert_official_state`)."""
    return OFFICIAL_NAMES.to_official(state_dict)
