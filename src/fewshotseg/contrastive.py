"""QGNet stage 1: global-local contrastive pre-training of the prior extractor (docs/methods/qgnet.md).

The authors never released this stage; their FSS code loads the MoCo key encoder `encoder_k` of a
ResNet-50 with the standard stem and PSPNet's dilation (`checkpoint_2000.pth.tar`). This module
trains one the way the paper describes, with MoCo-v2 defaults where it is silent:

    view 1 --f_q--> layer4 --avg--> g_q --MLP--> q        InfoNCE(q, k+, queue)          (global)
                          \\--MAP per superpixel--> MLP --> q_r
    view 2 --f_k--> layer4 --avg--> g_k --MLP--> k        InfoNCE(q_r, k_r+, other regions) (local)
     (momentum encoder)   \\--MAP per superpixel--> MLP --> k_r

    L = L_global + local_weight * L_local;   f_k <- m f_k + (1 - m) f_q  (m = 0.999)

- Global: MoCo-v2 (2-layer MLP head C -> C -> 128, L2-normalised, tau = 0.2, a queue of keys).
- Local: superpixel r of the image, carried through both views' geometric transforms
  (data/unlabeled.py), is pooled (masked average pooling of the last level, the dilated layer4) in
  each view; its positive is the same region in the other view, its negatives every other region of
  the batch (plus an optional queue). Regions must cover >= `min_cells` feature cells in both views.
- DDP: keys of every rank go into the queues (`concat_all_gather`); the key encoder's BatchNorm sees
  a batch shuffled across ranks (MoCo's shuffle-BN, `shuffle_bn=true`), so the positive pair never
  shares batch statistics. `shuffle_bn=false` with `trainer.sync_batchnorm=true` is the SyncBN
  alternative. On one device neither applies (as in MoCo's single-GPU runs).
- Export (`export_prior_extractor`): the key encoder's backbone weights only, with timm/torchvision
  ResNet names (conv1, bn1, layer1..layer4; no fc, no heads), which `method=qgnet` loads as its
  prior extractor.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from fewshotseg.errors import ConfigError

LEVEL = 4  # the last stage (the dilated layer4): the features QGNet's prior extractor gives


# ------------------------------------------------------------------------------------------------
# Losses and region pooling
# ------------------------------------------------------------------------------------------------


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor | None = None,
    tau: float = 0.2,
    batch_negatives: bool = False,
) -> torch.Tensor:
    """InfoNCE = CE over [q.k+, q.n_1, ...] / tau with the positive as the target; inputs L2-normalised.

    q, k: [N, D], k[i] is q[i]'s positive. negatives: [K, D] shared by every query (a queue).
    batch_negatives: the other rows of k are negatives too (the local term's "other regions")."""
    if batch_negatives:
        logits, target = q @ k.T, torch.arange(q.shape[0], device=q.device)
    else:
        logits = (q * k).sum(1, keepdim=True)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if negatives is not None and negatives.numel():
        logits = torch.cat([logits, q @ negatives.T], 1)
    return F.cross_entropy(logits / tau, target)


def _pixel_cells(regions: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature cell of every pixel of an [B,H,W] map (cell row of pixel row y = floor(y h / H))
    [1,H,W], and the number of pixels in each cell [h*w]."""
    (H, W), (h, w), dev = regions.shape[-2:], size, regions.device
    cell = ((torch.arange(H, device=dev) * h // H)[:, None] * w + torch.arange(W, device=dev) * w // W)[None]
    return cell, torch.bincount(cell.flatten(), minlength=h * w).clamp(min=1)


def region_weights(regions: torch.Tensor, num_regions: int, size: tuple[int, int]) -> torch.Tensor:
    """How much of each feature cell each region covers: regions [B,H,W] ids (< 0: none) ->
    [B, num_regions, h*w], the fraction of the cell's pixels.

    Masked average pooling with these weights equals pooling the features nearest-upsampled to the
    view (exactly when H, W are multiples of h, w); sums over the last axis are areas in cells."""
    B, n_cells = regions.shape[0], size[0] * size[1]
    cell, per_cell = _pixel_cells(regions, size)
    keep = (regions >= 0) & (regions < num_regions)
    b = torch.arange(B, device=regions.device)[:, None, None]
    flat = ((b * num_regions + regions.clamp(min=0)) * n_cells + cell)[keep]
    counts = torch.bincount(flat, minlength=B * num_regions * n_cells).view(B, num_regions, n_cells)
    return counts / per_cell


def region_areas(regions: torch.Tensor, num_regions: int, size: tuple[int, int]) -> torch.Tensor:
    """region_weights(...).sum(-1) without the [B, R, h*w] tensor: each region's area in cells [B, R]."""
    B = regions.shape[0]
    cell, per_cell = _pixel_cells(regions, size)
    keep = (regions >= 0) & (regions < num_regions)
    idx = (torch.arange(B, device=regions.device)[:, None, None] * num_regions + regions.clamp(min=0))[keep]
    share = (1.0 / per_cell.float())[cell.expand_as(regions)[keep]]
    return torch.bincount(idx, weights=share, minlength=B * num_regions).view(B, num_regions).float()


def region_pool(feat: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Masked average pooling of feat [B,C,h,w] over each region: weights [B,R,h*w] -> [B,R,C]."""
    pooled = torch.bmm(weights.to(feat.dtype), feat.flatten(2).transpose(1, 2))
    return pooled / (weights.sum(-1, keepdim=True).to(feat.dtype) + eps)


def matched_regions(
    regions1: torch.Tensor, regions2: torch.Tensor, size: tuple[int, int], min_cells: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the superpixels that cover >= min_cells feature cells in both views, renumbered 0..n_b-1
    per image (other pixels -1): -> (regions1, regions2, valid [B, R]) with R = max n_b (>= 1)."""
    num = int(max(regions1.max(), regions2.max()).item()) + 1
    area1, area2 = region_areas(regions1, num, size), region_areas(regions2, num, size)
    keep = (area1 >= min_cells) & (area2 >= min_cells)  # [B, num]
    new_id = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(keep, -1, dtype=torch.long))
    count = keep.sum(1)
    R = max(1, int(count.max().item()))
    R = max_across_ranks(R, regions1.device)  # the same padded size on every rank (gathers)
    valid = torch.arange(R, device=count.device)[None] < count[:, None]

    def renumber(regions: torch.Tensor) -> torch.Tensor:
        safe = regions.clamp(min=0)
        out = torch.gather(new_id, 1, safe.flatten(1)).view_as(regions)
        return torch.where(regions >= 0, out, torch.full_like(out, -1))

    return renumber(regions1), renumber(regions2), valid


# ------------------------------------------------------------------------------------------------
# DDP helpers (no-ops on one process)
# ------------------------------------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [N, ...] of every rank along dim 0 (rank order); equal N on every rank."""
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def max_across_ranks(value: int, device: torch.device) -> int:
    if _world() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def shuffle_across_ranks(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """MoCo's shuffle-BN: give each rank a random slice of the global batch -> (this rank's slice of
    each tensor, the permutation that undoes it). Every rank draws the same permutation (rank 0's)."""
    if _world() == 1:
        return list(tensors), torch.arange(tensors[0].shape[0], device=tensors[0].device)
    gathered = [concat_all_gather(t) for t in tensors]
    perm = torch.randperm(gathered[0].shape[0], device=gathered[0].device)
    dist.broadcast(perm, src=0)
    mine = perm.view(_world(), -1)[dist.get_rank()]
    return [g[mine] for g in gathered], torch.argsort(perm)


@torch.no_grad()
def unshuffle_across_ranks(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """The inverse of `shuffle_across_ranks` for a result computed on the shuffled slice."""
    if _world() == 1:
        return x
    return concat_all_gather(x)[unshuffle.view(_world(), -1)[dist.get_rank()]]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo-v2's projection head: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class _Encoder(nn.Module):
    """A backbone with its global and local heads; query and key encoders are two copies."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int | None):
        super().__init__()
        self.backbone = backbone
        channels = backbone.channels[LEVEL]
        self.head = mlp_head(channels, hidden or channels, dim)
        self.local_head = mlp_head(channels, hidden or channels, dim)

    def embed(self, feat: torch.Tensor, regions: torch.Tensor, num_regions: int):
        """Level-4 features -> (global embedding [B,D], region embeddings [B,R,D]), L2-normalised."""
        feat = feat.float()
        g = F.normalize(self.head(feat.mean((2, 3))), dim=1)
        weights = region_weights(regions, num_regions, tuple(feat.shape[-2:]))
        r = F.normalize(self.local_head(region_pool(feat, weights)), dim=-1)
        return g, r

    def forward(self, x: torch.Tensor, regions: torch.Tensor, num_regions: int):
        return self.embed(self.backbone(x)[LEVEL], regions, num_regions)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """lr = base_lr * 0.5 (1 + cos(pi t / T)) per step (MoCo-v2's cosine), after a linear warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return LambdaLR(optimizer, factor)


class GlobalLocalMoCo(LightningModule):
    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        dim: int = 128,
        hidden: int | None = None,
        queue_size: int = 16384,
        momentum: float = 0.999,
        tau: float = 0.2,
        local_weight: float = 1.0,
        local_queue_size: int = 0,
        min_cells: float = 4.0,
        shuffle_bn: bool = True,
        base_lr: float = 0.03,
        lr: float | None = None,
        sgd_momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0,
        run_config: dict | None = None,
    ):
        """backbone: the `backbone` group's partial, called with levels=[4]; it is trained
        (frozen=false) and its BatchNorm uses batch statistics (bn_mode=train), as in MoCo.
        lr: the effective learning rate; null = base_lr x global batch / 256 (MoCo's rule)."""
        super().__init__()
        bb = backbone(levels=[LEVEL])
        if bb.frozen:
            raise ConfigError(
                "backbone.frozen=true: pre-training trains the encoder; set backbone.frozen=false"
            )
        if getattr(bb, "_has_bn", False) and bb.bn_mode != "train":
            raise ConfigError(
                "backbone.bn_mode=eval: contrastive pre-training from scratch needs BatchNorm with batch "
                "statistics; set backbone.bn_mode=train"
            )
        if not 0.0 <= momentum < 1.0 or tau <= 0 or queue_size < 0 or local_queue_size < 0:
            raise ConfigError(
                f"model: expected 0 <= momentum < 1, tau > 0, queue sizes >= 0; got momentum={momentum}, "
                f"tau={tau}, queue_size={queue_size}, local_queue_size={local_queue_size}"
            )
        self.arch = bb.name
        self.encoder_q = _Encoder(bb, dim, hidden)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # MoCo: the key encoder starts as a copy
        self.encoder_k.requires_grad_(False)
        self.momentum, self.tau, self.local_weight, self.min_cells = momentum, tau, local_weight, min_cells
        self.shuffle_bn = shuffle_bn
        self.base_lr, self.lr, self.sgd_momentum, self.weight_decay = base_lr, lr, sgd_momentum, weight_decay
        self.warmup_epochs = warmup_epochs
        self.config = run_config  # the run's resolved config, stored in checkpoints
        # Queues of past keys (columns L2-normalised random at start, as MoCo), saved with checkpoints.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("local_queue", F.normalize(torch.randn(local_queue_size, dim), dim=1))
        self.register_buffer("local_queue_ptr", torch.zeros((), dtype=torch.long))

    # --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @staticmethod
    @torch.no_grad()
    def _enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
        """Write keys at the pointer, wrapping around (any batch size, not only divisors of K)."""
        size = queue.shape[0]
        if size == 0 or keys.shape[0] == 0:
            return
        keys = keys[-size:]
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        queue[idx] = keys.to(queue.dtype)
        ptr.copy_((ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, regions: torch.Tensor, num_regions: int):
        """The key encoder's embeddings; under DDP its BatchNorm sees a batch shuffled across ranks."""
        if self.shuffle_bn:
            (x, regions), unshuffle = shuffle_across_ranks(x, regions)
        g, r = self.encoder_k(x, regions, num_regions)
        if self.shuffle_bn:
            g, r = unshuffle_across_ranks(g, unshuffle), unshuffle_across_ranks(r, unshuffle)
        return g, r

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The losses of a batch of view pairs (updates the key encoder and the queues in training)."""
        x1, x2 = batch["view1"], batch["view2"]
        feat = self.encoder_q.backbone(x1)[LEVEL]
        r1, r2, valid = matched_regions(
            batch["regions1"].long(), batch["regions2"].long(), tuple(feat.shape[-2:]), self.min_cells
        )
        q, q_regions = self.encoder_q.embed(feat, r1, valid.shape[1])
        if self.training:
            self.momentum_update()
        k, k_regions = self._keys(x2, r2, valid.shape[1])

        queue, local_queue = self.queue.clone(), self.local_queue.clone()  # before this batch's keys
        loss_global = info_nce(q, k, queue, self.tau)
        if valid.any():
            loss_local = info_nce(
                q_regions[valid], k_regions[valid], local_queue, self.tau, batch_negatives=True
            )
        else:  # no region survived both crops: keep the local head in the graph (DDP), add nothing
            loss_local = 0.0 * q_regions.sum()
        if self.training:
            self._enqueue(self.queue, self.queue_ptr, concat_all_gather(k))
            if len(self.local_queue):
                all_regions, all_valid = concat_all_gather(k_regions), concat_all_gather(valid)
                self._enqueue(self.local_queue, self.local_queue_ptr, all_regions[all_valid])
        out = {
            "loss": loss_global + self.local_weight * loss_local,
            "loss_global": loss_global,
            "loss_local": loss_local,
            "regions": valid.sum(1).float().mean(),  # matched superpixels per image
        }
        if len(queue):  # how often the positive key beats every queued key
            with torch.no_grad():
                out["acc_global"] = ((q * k).sum(1) > (q @ queue.T).max(1).values).float().mean()
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        bs = batch["view1"].shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs, sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return out["loss"]

    # --------------------------------------------------------------------------------------------

    def effective_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        batch = self.trainer.datamodule.batch_size if self._trainer is not None else 256
        return self.base_lr * batch * world * accumulate / 256

    def configure_optimizers(self):
        params = [p for p in self.encoder_q.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=self.effective_lr(), momentum=self.sgd_momentum, weight_decay=self.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        scheduler = cosine_schedule(optimizer, total, int(self.warmup_epochs * per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint["fewshotseg_config"] = self.config
        checkpoint["fewshotseg_pretrain_arch"] = self.arch


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------


class ImagesPerSecond(Callback):
    """Training throughput in images/s (one image = its two views), measured from the end of one
    training step to the end of the next, so data loading counts; the first `skip` steps (warm-up,
    worker start) are left out. Logged as `train/images_per_s` and printed after each epoch."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.images, self.seconds, self._last, self._seen = 0, 0.0, None, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last, self._seen = None, 0  # the epoch boundary (workers restart) is not timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._last is not None and self._seen > self.skip:
            n = batch["view1"].shape[0] * trainer.world_size
            self.images += n
            self.seconds += now - self._last
            pl_module.log(
                "train/images_per_s", n / max(now - self._last, 1e-9), batch_size=n // trainer.world_size
            )
        self._last = now

    @property
    def rate(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.rate is not None:
            print(f"epoch {trainer.current_epoch}: {self.rate:.1f} images/s (mean so far, all devices)")


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

ENCODERS = {"key": "encoder_k", "query": "encoder_q"}


def _backbone_net(backbone: nn.Module) -> nn.Module:
    """The module whose state dict has timm's ResNet names (conv1, bn1, layer1..layer4)."""
    net = getattr(backbone, "net", None)
    return net if isinstance(net, nn.Module) else backbone.body


def prior_extractor_state(module: GlobalLocalMoCo, encoder: str = "key") -> dict[str, torch.Tensor]:
    """The backbone of the key (default, what QGNet's code loads) or query encoder, without heads."""
    if encoder not in ENCODERS:
        raise ConfigError(f"export_encoder={encoder!r}: expected one of {list(ENCODERS)}")
    net = _backbone_net(getattr(module, ENCODERS[encoder]).backbone)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def save_prior_extractor(state: dict[str, torch.Tensor], arch: str, path: str | Path, encoder: str) -> Path:
    """{"state_dict": backbone tensors, "arch": name, "encoder": "encoder_k"|"encoder_q"}, loadable
    with torch.load(weights_only=True) and by `Backbone(weights=...)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "arch": arch, "encoder": ENCODERS[encoder]}, path)
    return path


def export_prior_extractor(module: GlobalLocalMoCo, path: str | Path, encoder: str = "key") -> Path:
    return save_prior_extractor(prior_extractor_state(module, encoder), module.arch, path, encoder)


def export_from_checkpoint(ckpt_path: str | Path, path: str | Path, encoder: str = "key") -> Path:
    """The export of a pre-training checkpoint (e.g. last.ckpt), without rebuilding the model: the
    `encoder_k.backbone.<net>.*` tensors of its state dict, renamed to the bare backbone names."""
    from fewshotseg import checkpoints

    if not Path(ckpt_path).is_file():  # before the encoder check, as before
        raise ConfigError(f"export={ckpt_path}: no such checkpoint file")
    if encoder not in ENCODERS:
        raise ConfigError(f"export_encoder={encoder!r}: expected one of {list(ENCODERS)}")
    ckpt = checkpoints.read(ckpt_path, "export", "no such checkpoint file")
    arch = ckpt.get("fewshotseg_pretrain_arch") if isinstance(ckpt, dict) else None
    if arch is None:
        raise ConfigError(
            f"export={ckpt_path} was not written by fewshotseg.pretrain (no pre-training model)"
        )
    prefix = f"{ENCODERS[encoder]}.backbone."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    for inner in ("net.", "body."):  # the Backbone wrapper's attribute: keys become conv1.*, layer1.*, ...
        if any(k.startswith(inner) for k in state):
            state = {k[len(inner) :]: v for k, v in state.items() if k.startswith(inner)}
            break
    if not state:
        raise ConfigError(f"export={ckpt_path}: no {prefix}* tensors in its state dict")
    return save_prior_extractor(state, arch, path, encoder)
