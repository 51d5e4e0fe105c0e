"""DPNet (Mao et al., AAAI 2022, "Learning from the Target: Dual Prototype Network for Few Shot
Semantic Segmentation"), reconstructed. 1-way, K-shot.

No code of the authors exists and only the abstract and a third-party quote of the Fig. 2 caption
could be found (docs/methods/dpnet.md). Confirmed: a support prototype P and a pseudo-prototype Pq
from reliable query foreground features selected by a cycle comparison module (CCM); a prototype
interaction module (PIM) that uses the P-Pq correlation to reinforce both prototypes and the query
feature; a multi-scale fusion (MSF) of the dense comparison feeding a decoder; an auxiliary branch
used in training only. Every rule below is this project's proposal (docs/methods/dpnet.md), built in
the PFENet family, and every choice is a constructor switch (`ccm`, `pim`, `msf`, `aux`):

1. Query and supports -> frozen backbone -> mid features fuse_levels(levels 3, 2) -> `down_query` /
   `down_supp` (1x1 -> 256, ReLU, Dropout2d 0.5: PFENet's projections).
2. P = PFENet MAP of the support features under the support mask (bilinear to the feature size,
   align_corners=True), averaged over the K shots.
3. CCM (no gradient through the selection): forward s(i) = minmax(cos(F_q(i), P)); backward: the
   nearest support position j*(i) over all positions of all shots; i is reliable iff
   s(i) >= tau_f and M_s(j*(i)) >= 0.5. Pq = mean of F_q over the reliable set R; if |R| < k_min the
   top-k_min positions by s; if s carries no ranking (empty support mask, constant map) Pq = P.
4. PIM: rho = ReLU(cos(P, Pq)), g = sigmoid(MLP([P; Pq])); P' = P + rho g*Pq, Pq' = Pq + rho g*P,
   F_q' = F_q * (1 + g).
5. MSF: PFENet's FEM on F_q' with the vectors [P'; Pq'] and the maps [minmax cos(F_q', P'),
   minmax cos(F_q', Pq'), R] (+ the PFENet prior as an option); logits upsampled (bilinear,
   align_corners=True) to the input size.
6. Training only: `aux` = the FEM's inner CE (mean over bins) and `cycle` = CE of the support masks
   segmented by [P_bg^q, Pq] (20 x cosine, P_bg^q = MAP of the query outside R).

Backbone passes follow ASGNet/PFENet: while the backbone's BatchNorms use batch statistics
(`bn_mode: train`, the PFENet code's behaviour) the query and each shot go through it in separate
calls; otherwise all supports go through in one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fewshotseg.backbones import fuse_levels
from fewshotseg.data.episode import Episode
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import Method
from fewshotseg.modules.fem import FEM, inner_loss, upsample_logits
from fewshotseg.modules.projection import mid_projection
from fewshotseg.ops.prior import training_free_prior
from fewshotseg.ops.prototypes import cosine_logits, weighted_gap

EPS = 1e-7  # cosine and min-max guards, as PFENet's prior

MID_LEVELS = (3, 2)  # PFENet's "mid" feature: cat(layer3, layer2)
HIGH_LEVEL = 4


# ------------------------------------------------------------------------------------------------
# Switches (every reconstructed choice; defaults = docs/methods/dpnet.md)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CCMConfig:
    """tau_f: forward threshold on the min-max normalised s; k_min: smallest reliable set before the
    top-k fallback; use_backward_check: false = forward threshold only (ablation);
    mask_threshold: M_s(j*) at or above it counts as support foreground."""

    tau_f: float = 0.5
    k_min: int = 8
    use_backward_check: bool = True
    mask_threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class PIMConfig:
    """enabled: false = P' = P, Pq' = Pq, F_q' = F_q (ablation); hidden: the gate MLP's width."""

    enabled: bool = True
    hidden: int = 128


@dataclasses.dataclass(frozen=True)
class MSFConfig:
    """use_reliability_map: R as a decoder input map (false: ablation); use_pfenet_prior: also the
    PFENet training-free prior from level 4 (+1 channel)."""

    use_reliability_map: bool = True
    use_pfenet_prior: bool = False


@dataclasses.dataclass(frozen=True)
class AuxConfig:
    """enabled: the support-by-Pq branch in training (its weight is `aux_weights.cycle` in the
    method config); scale: the cosine scale (PANet's 20)."""

    enabled: bool = True
    scale: float = 20.0


def _switches(cls, value: Any, key: str):
    """A config dataclass from a dict (or DictConfig, or an instance); unknown keys are an error."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"method.model.{key}: expected a mapping of switches, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"method.model.{key}: unknown keys {unknown}; expected some of {sorted(known)}")
    return cls(**{k: value[k] for k in value})


# ------------------------------------------------------------------------------------------------
# Parameter-free pieces
# ------------------------------------------------------------------------------------------------


def minmax(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-image min-max normalisation of [B,1,h,w] maps to [0, 1]; a constant map gives 0."""
    flat = x.flatten(1)
    lo, hi = flat.min(1)[0], flat.max(1)[0]
    return (x - lo[:, None, None, None]) / (hi - lo + eps)[:, None, None, None]


def cosine_map(feat: torch.Tensor, proto: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """cos(feat(i), proto): [B,C,h,w], [B,C] -> [B,1,h,w]; a zero vector gives 0."""
    return F.cosine_similarity(feat, proto[:, :, None, None], dim=1, eps=eps)[:, None]


class CCMOutput(NamedTuple):
    pseudo: torch.Tensor  # Pq [B, C]
    reliable: torch.Tensor  # R [B, 1, h, w] in {0, 1}: the positions Pq averages
    fallback: torch.Tensor  # [B] long: 0 reliable set, 1 top-k_min by s, 2 Pq = P


FALLBACK_NONE, FALLBACK_TOPK, FALLBACK_SUPPORT = 0, 1, 2


@torch.no_grad()
def nearest_support_is_foreground(
    q_feat: torch.Tensor, s_feat: torch.Tensor, s_mask: torch.Tensor, threshold: float = 0.5
) -> torch.Tensor:
    """The backward comparison: for every query position i, j*(i) = argmax_j cos(F_q(i), F_s(j))
    over all positions j of all K shots; returns M_s(j*(i)) >= threshold as [B,1,h,w] bool.

    q_feat [B,C,h,w]; s_feat [B,K,C,h',w']; s_mask [B,K,1,h',w'] (soft, at feature size). One shot
    at a time, so the [B, hw, h'w'] similarity is the largest tensor (as the PFENet prior)."""
    B, C, h, w = q_feat.shape
    q = F.normalize(q_feat.reshape(B, C, h * w), dim=1, eps=EPS)  # [B, C, hw]
    best = torch.full((B, h * w), -2.0, dtype=q.dtype, device=q.device)
    best_fg = torch.zeros(B, h * w, dtype=torch.bool, device=q.device)
    for k in range(s_feat.shape[1]):
        s = F.normalize(s_feat[:, k].reshape(B, C, -1), dim=1, eps=EPS)  # [B, C, h'w']
        val, idx = torch.bmm(q.transpose(1, 2), s).max(2)  # [B, hw]
        fg = s_mask[:, k].reshape(B, -1).gather(1, idx) >= threshold
        better = val > best  # strict: the first shot wins ties, as an argmax over all shots
        best, best_fg = torch.where(better, val, best), torch.where(better, fg, best_fg)
    return best_fg.view(B, 1, h, w)


def cycle_comparison(
    q_feat: torch.Tensor,
    s_feat: torch.Tensor,
    s_mask: torch.Tensor,
    proto: torch.Tensor,
    cfg: CCMConfig = CCMConfig(),
) -> CCMOutput:
    """CCM: select reliable query foreground and average it into the pseudo-prototype Pq.

    q_feat [B,C,h,w]; s_feat [B,K,C,h',w']; s_mask [B,K,1,h',w'] soft support masks at feature size;
    proto P [B,C]. The selection is a hard mask computed without gradient; Pq carries the gradient of
    the averaged query features."""
    B, C, h, w = q_feat.shape
    with torch.no_grad():
        raw = cosine_map(q_feat, proto)  # forward comparison
        s = minmax(raw)
        reliable = s >= cfg.tau_f
        if cfg.use_backward_check:
            reliable &= nearest_support_is_foreground(q_feat, s_feat, s_mask, cfg.mask_threshold)
        flat = s.reshape(B, h * w)
        topk = torch.zeros_like(flat, dtype=torch.bool)
        topk.scatter_(1, flat.topk(min(cfg.k_min, h * w), dim=1).indices, True)
        # no ranking at all: no support foreground (P = 0) or a constant similarity map
        flat_raw = raw.reshape(B, h * w)
        no_rank = (s_mask.flatten(1).sum(1) <= 0) | (flat_raw.max(1)[0] - flat_raw.min(1)[0] <= EPS)
        enough = reliable.reshape(B, -1).sum(1) >= cfg.k_min
        fallback = torch.where(
            enough,
            torch.full_like(enough, FALLBACK_NONE, dtype=torch.long),
            torch.where(no_rank, FALLBACK_SUPPORT, FALLBACK_TOPK),
        )
        used = torch.where(enough[:, None], reliable.reshape(B, -1), topk & ~no_rank[:, None])
        used = used.view(B, 1, h, w).to(q_feat.dtype)
    mean = (q_feat * used).sum((2, 3)) / used.sum((2, 3)).clamp(min=1)
    pseudo = torch.where((fallback == FALLBACK_SUPPORT)[:, None], proto, mean)
    return CCMOutput(pseudo, used, fallback)


# ------------------------------------------------------------------------------------------------
# Learnable pieces
# ------------------------------------------------------------------------------------------------


class PIM(nn.Module):
    """Prototype interaction: rho = ReLU(cos(P, Pq)), g = sigmoid(MLP([P; Pq])) (2C -> hidden -> C);
    P' = P + rho g*Pq, Pq' = Pq + rho g*P, F_q' = F_q * (1 + g). With rho = 0 (orthogonal or
    unreliable Pq) the prototypes pass unchanged."""

    def __init__(self, dim: int = 256, hidden: int = 128):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(
        self, proto: torch.Tensor, pseudo: torch.Tensor, q_feat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rho = F.relu(F.cosine_similarity(proto, pseudo, dim=1, eps=EPS))[:, None]
        g = torch.sigmoid(self.gate(torch.cat([proto, pseudo], 1)))
        return proto + rho * g * pseudo, pseudo + rho * g * proto, q_feat * (1 + g[:, :, None, None])


class DPNet(Method):
    """DPNet, reconstructed (see the module docstring and docs/methods/dpnet.md).

    Args:
        backbone: partial of `fewshotseg.backbones.Backbone`; called with the levels it needs
            (2, 3, and 4 when the PFENet prior is on).
        reduce_dim: width of the projections, the prototypes and the decoder (256).
        bins: FEM pyramid bins (PASCAL: [60, 30, 15, 8]; COCO: [1.0, 0.5, 0.25, 0.125]).
        dropout: Dropout2d of `down_query` / `down_supp` (0.5).
        ccm, pim, msf, aux: switches, dicts of the fields of CCMConfig, PIMConfig, MSFConfig,
            AuxConfig (unknown keys raise ConfigError).
    """

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        reduce_dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        dropout: float = 0.5,
        ccm: Mapping | CCMConfig | None = None,
        pim: Mapping | PIMConfig | None = None,
        msf: Mapping | MSFConfig | None = None,
        aux: Mapping | AuxConfig | None = None,
    ):
        super().__init__()
        self.ccm_cfg = _switches(CCMConfig, ccm, "ccm")
        self.pim_cfg = _switches(PIMConfig, pim, "pim")
        self.msf_cfg = _switches(MSFConfig, msf, "msf")
        self.aux_cfg = _switches(AuxConfig, aux, "aux")
        if not 0.0 <= self.ccm_cfg.tau_f <= 1.0:
            raise ConfigError(f"method.model.ccm.tau_f={self.ccm_cfg.tau_f}: expected a value in [0, 1]")
        if int(self.ccm_cfg.k_min) < 1:
            raise ConfigError(f"method.model.ccm.k_min={self.ccm_cfg.k_min}: expected an integer >= 1")

        levels = sorted({*MID_LEVELS, *((HIGH_LEVEL,) if self.msf_cfg.use_pfenet_prior else ())})
        self.backbone = backbone(levels=levels)
        mid_channels = sum(self.backbone.channels[lv] for lv in MID_LEVELS)
        self.down_query = mid_projection(mid_channels, reduce_dim, dropout)
        self.down_supp = mid_projection(mid_channels, reduce_dim, dropout)
        self.pim = PIM(reduce_dim, self.pim_cfg.hidden) if self.pim_cfg.enabled else None
        n_maps = 2 + int(self.msf_cfg.use_reliability_map) + int(self.msf_cfg.use_pfenet_prior)
        self.fem = FEM(3 * reduce_dim + n_maps, bins=bins, reduce_dim=reduce_dim)

    # -- features --------------------------------------------------------------------------------

    def _mid(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        return fuse_levels(feats, MID_LEVELS)

    def support_features(
        self, supports: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """supports [N,3,H,W], mask [N,1,H,W] (label == 1) -> (mid [N,C,h,w], masked level 4 or None,
        mask at the feature size [N,1,h,w], bilinear align_corners=True as PFENet)."""
        feats = self.backbone(supports, levels=MID_LEVELS)  # level 4 only on the masked map
        mid = self._mid(feats)
        small = F.interpolate(mask, size=mid.shape[-2:], mode="bilinear", align_corners=True)
        high = None
        if self.msf_cfg.use_pfenet_prior:  # PFENet: layer4 of the masked layer3, masked again
            l3 = feats[3]
            m3 = F.interpolate(mask, size=l3.shape[-2:], mode="bilinear", align_corners=True)
            high = self.backbone.run_stage(l3 * m3, HIGH_LEVEL)
            high = high * F.interpolate(mask, size=high.shape[-2:], mode="bilinear", align_corners=True)
        return mid, high, small

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, supports, s_labels = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, K = supports.shape[:2]
        s_fg = (s_labels == 1).to(query.dtype).unsqueeze(2)  # [B,K,1,H,W]; 255 counts as background

        q_feats = self.backbone(query)
        q_feat = self.down_query(self._mid(q_feats))
        if self.backbone.uses_batch_stats:  # PFENet: one backbone call per shot
            parts = [self.support_features(supports[:, k], s_fg[:, k]) for k in range(K)]
            s_mid = torch.stack([p[0] for p in parts], 1).flatten(0, 1)
            s_high = None if parts[0][1] is None else torch.stack([p[1] for p in parts], 1)
            s_mask = torch.stack([p[2] for p in parts], 1)
        else:
            s_mid, s_high, s_mask = self.support_features(supports.flatten(0, 1), s_fg.flatten(0, 1))
            s_high = None if s_high is None else s_high.unflatten(0, (B, K))
            s_mask = s_mask.unflatten(0, (B, K))
        s_feat = self.down_supp(s_mid)  # [B*K, C, h, w]
        s_feat_bk = s_feat.unflatten(0, (B, K))

        proto = weighted_gap(s_feat, s_mask.flatten(0, 1)).unflatten(0, (B, K)).mean(1)  # P [B, C]
        pseudo, reliable, _ = cycle_comparison(q_feat, s_feat_bk, s_mask, proto, self.ccm_cfg)

        if self.pim is not None:
            proto_r, pseudo_r, q_r = self.pim(proto, pseudo, q_feat)
        else:
            proto_r, pseudo_r, q_r = proto, pseudo, q_feat

        maps = [minmax(cosine_map(q_r, proto_r)), minmax(cosine_map(q_r, pseudo_r))]
        if self.msf_cfg.use_reliability_map:
            maps.append(reliable)
        if self.msf_cfg.use_pfenet_prior:
            maps.append(training_free_prior(q_feats[HIGH_LEVEL], s_high, q_feat.shape[-2:]))
        out, inner = self.fem(q_r, vectors=torch.cat([proto_r, pseudo_r], 1), maps=torch.cat(maps, 1))
        logits = upsample_logits(out, query.shape[-2:])

        aux = {}
        if self.training and "query_mask" in batch:
            aux["aux"] = inner_loss(inner, batch["query_mask"])
        if self.training and self.aux_cfg.enabled:
            aux["cycle"] = self.cycle_loss(q_feat, reliable, pseudo, s_feat, s_labels)
        return logits, aux

    def cycle_loss(
        self,
        q_feat: torch.Tensor,
        reliable: torch.Tensor,
        pseudo: torch.Tensor,
        s_feat: torch.Tensor,
        s_labels: torch.Tensor,
    ) -> torch.Tensor:
        """The training-only auxiliary branch: segment every support image with [P_bg^q, Pq]
        (scale x cosine), CE against its mask (ignore 255, pixel mean, 0 when all ignored)."""
        B, K = s_labels.shape[:2]
        background = weighted_gap(q_feat, 1 - reliable)  # the query outside R
        protos = torch.stack([background, pseudo], 1).repeat_interleave(K, 0)  # [B*K, 2, C]
        logits = cosine_logits(s_feat, protos, scale=self.aux_cfg.scale)
        return inner_loss([logits], s_labels.flatten(0, 1))
