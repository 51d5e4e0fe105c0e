"""Feature reuse in evaluation: a frozen backbone's maps of an image, computed once.

In evaluation the same images recur: a fold's test episodes draw their queries and supports from
one pool of images, seeds repeat them, every validation of a training run shows the same fixed
list. When the backbone is frozen and the test transform deterministic, an image's backbone maps
are the same every time it is seen, so `FeatureCache` keeps them and the backbone returns the kept
maps instead of running again.

The key is the *transformed image itself* (a 128-bit BLAKE2 digest of its bytes, shape and dtype),
with the backbone it went through, the autocast state and the name of the map (a level, or a block
of a level). The digest stands for (image id, transform): it needs nothing from the method (which
arranges queries and supports in its own batches) and cannot go stale when the transform or the
resolution changes. A method's masked stage (`Backbone.run_stage`, PFENet's support layer 4 on the
masked layer 3) is kept under the digest of its input, the masked map: reused only for the same
support with the same mask.

Exactness: stored maps are the exact tensors the backbone returned (fp32 stays fp32), so a hit
gives what a miss would have computed, provided the backbone's output for an image does not depend
on the other images of its batch: true for a frozen backbone in eval mode (BatchNorm on running
statistics) up to the last bit, which convolution kernels chosen per batch size may round
differently (1.2e-7 seen on one CPU, none on another; likely on GPUs). The metric states come out
identical in the tests (tests/test_feature_cache.py, every method); a pixel whose two logits tie
to the last bit could in principle flip. `FeatureCache.begin` drops every entry when the
backbone's weights or buffers changed (a checkpoint loaded, BatchNorm statistics that drifted in
training), seen by the tensors' in-place version counters.

The store is bounded (`max_gb`), least recently used entries go first, and it counts hits and
misses per image; `summary()` is the line the run prints. It lives in the process that computes
(one per DDP rank).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import albumentations as A
import torch
from torch import nn

from fewshotseg.backbones import Backbone
from fewshotseg.data.transforms import PadTransform, PairTransform
from fewshotseg.errors import ConfigError

# Default bounds: a share of a 24 GB workstation's memory on CPU, a share of the GPU's memory.
DEFAULT_CPU_GB = 4.0
DEFAULT_GPU_SHARE = 0.25

Maps = dict[Hashable, torch.Tensor]  # name -> [N, ...] batch of maps


def _bytes_view(t: torch.Tensor):
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()


def image_digest(image: torch.Tensor) -> bytes:
    """128-bit digest of one transformed image (its bytes, shape and dtype)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(image.shape), str(image.dtype))).encode())
    h.update(_bytes_view(image))
    return h.digest()


def state_version(module: nn.Module) -> tuple:
    """Identity and in-place version counter of every parameter and buffer of `module`: changes
    when its weights or BatchNorm statistics do (an optimiser step, a running-statistics update,
    `load_state_dict`, any in-place write bumps the counter; replaced data has another address).
    As cheap as a look at each tensor, unlike a digest of its contents."""
    return tuple((id(t), t.data_ptr(), t._version) for t in [*module.parameters(), *module.buffers()])


def default_max_gb(device: torch.device | str | None = None) -> float:
    """The bound when none is configured: DEFAULT_CPU_GB on CPU, DEFAULT_GPU_SHARE of a GPU."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return DEFAULT_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory / 2**30
    return DEFAULT_CPU_GB


def _autocast_state(device_type: str) -> tuple:
    if not torch.is_autocast_enabled(device_type):
        return ()
    return (torch.get_autocast_dtype(device_type),)


class FeatureCache:
    """A bounded LRU store of per-image backbone maps.

    `rows(owner, images, names, compute)` returns {name: [N, ...]} for the batch `images`: rows
    whose every map is stored come from the store, the others from `compute(images[missing])`
    (which must return {name: [M, ...]} for at least `names`), and are stored; an image that occurs
    twice in the batch is computed once. A batch of distinct images with no hit is returned exactly
    as `compute` made it.
    """

    def __init__(self, max_gb: float | None = None):
        if max_gb is not None and float(max_gb) < 0:
            raise ConfigError(
                f"feature_reuse.max_gb={max_gb}: expected a size in GB >= 0 (or null: the default)"
            )
        self.max_gb = None if max_gb is None else float(max_gb)
        self.store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._states: dict[int, tuple] = {}

    # --- lifetime --------------------------------------------------------------------------------
    def max_bytes(self, device: torch.device | str | None = None) -> int:
        gb = self.max_gb if self.max_gb is not None else default_max_gb(device)
        return int(gb * 2**30)

    def begin(self, backbones: Iterable[nn.Module]) -> None:
        """Before an evaluation loop: drop everything if a backbone's state changed since the last."""
        states = {id(bb): state_version(bb) for bb in backbones}
        if states != self._states:
            self.clear()
            self._states = states

    def clear(self) -> None:
        self.store.clear()
        self.bytes = 0

    def reset_counts(self) -> None:
        self.hits = self.misses = self.evictions = 0

    @property
    def hit_rate(self) -> float:
        seen = self.hits + self.misses
        return self.hits / seen if seen else 0.0

    def summary(self) -> str:
        return (
            f"feature reuse: {self.hits}/{self.hits + self.misses} backbone passes from the cache "
            f"(hit rate {100 * self.hit_rate:.1f} %), {len(self.store)} maps, "
            f"{self.bytes / 2**20:.0f} MiB (peak {self.peak_bytes / 2**20:.0f} MiB), {self.evictions} evicted"
        )

    # --- lookup ----------------------------------------------------------------------------------
    def rows(
        self,
        owner: nn.Module,
        images: torch.Tensor,
        names: Sequence[Hashable],
        compute: Callable[[torch.Tensor], Maps],
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Maps:
        scope = (id(owner), _autocast_state(images.device.type))
        host = images.detach().cpu()  # one device-to-host copy for the batch's digests
        keys = [(scope, image_digest(image)) for image in host]
        stored = [all((key, name) in self.store for name in names) for key in keys]
        # an image shown twice in the batch (one query under several seeds) is computed once
        where: dict[tuple, int] = {}  # key -> its row among the computed ones
        for i, hit in enumerate(stored):
            if not hit:
                where.setdefault(keys[i], len(where))
        missing = [keys.index(key) for key in where]  # first row of each distinct missing image
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        # the hits are taken before storing the misses, which may evict some of them
        kept = {
            (i, name): self._get((key, name)) for i, key in enumerate(keys) if stored[i] for name in names
        }
        computed = compute(images[missing] if len(missing) < len(keys) else images) if missing else {}
        for j, i in enumerate(missing):
            for name in names:
                self._put((keys[i], name), computed[name][j])
        if len(missing) == len(keys):
            return {name: computed[name] for name in names}
        out = {}
        for name in names:
            maps = [computed[name][where[k]] if not stored[i] else kept[i, name] for i, k in enumerate(keys)]
            batch = torch.stack(maps)
            out[name] = batch.contiguous(memory_format=memory_format) if batch.dim() == 4 else batch
        return out

    def _get(self, key: tuple) -> torch.Tensor:
        self.store.move_to_end(key)
        return self.store[key]

    def _put(self, key: tuple, value: torch.Tensor) -> None:
        value = value.clone()  # its own storage: a row view would keep the whole batch alive
        size = value.numel() * value.element_size()
        limit = self.max_bytes(value.device)
        if size > limit:
            return
        if key in self.store:
            self.bytes -= self.store[key].numel() * self.store[key].element_size()
        self.store[key] = value
        self.store.move_to_end(key)
        self.bytes += size
        while self.bytes > limit:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1
        self.peak_bytes = max(self.peak_bytes, self.bytes)


# albumentations ops that map an image to one result (no random draw)
_DETERMINISTIC_OPS = (A.Resize, A.Normalize, A.LongestMaxSize, A.SmallestMaxSize, A.PadIfNeeded, A.CenterCrop)


def is_deterministic(transform) -> bool:
    """True when the test transform makes one tensor of an image whatever its seed: PFENet's pad
    resize, or a plain pipeline of resize/normalise/pad ops. Anything else (a random op, an unknown
    transform) is treated as random: no reuse."""
    if isinstance(transform, PadTransform):
        return True
    if type(transform) is PairTransform:
        return all(isinstance(op, _DETERMINISTIC_OPS) for op in transform.pipeline.transforms)
    return False


def frozen_backbones(method: nn.Module) -> list[Backbone]:
    """The backbones of `method` whose maps may be reused: frozen (no trainable tensor)."""
    return [
        m for m in method.modules()
        if isinstance(m, Backbone) and (m.frozen or not any(p.requires_grad for p in m.parameters()))
    ]  # fmt: skip


@contextmanager
def reusing(cache: FeatureCache | None, backbones: Sequence[Backbone]) -> Iterator[None]:
    """Within the block, `backbones` serve their no-gradient passes from `cache`."""
    for backbone in backbones:
        backbone.feature_cache = cache
    try:
        yield
    finally:
        for backbone in backbones:
            backbone.feature_cache = None
