"""Checkpoint and weight files, read in one place.

- `read(path, key)`: a .pth/.pt/.tar/.ckpt file with `torch.load(weights_only=True)` (never unpickled
  code) or a .safetensors file; a missing or unreadable file is one ConfigError line naming `key=path`.
- `unwrap(obj)`: the state dict inside the usual wrappers (`state_dict`, `model`, ...).
- `strip_prefix(state, prefix)`: DataParallel's `module.` (or any prefix) removed where present.
- `package_backbone_state(state)`: a Backbone's tensors in this package's own Lightning checkpoints
  (`method.backbone.body.*` of FewShotSegModule / SemanticModule, `encoder_k.backbone.body.*` of a
  pre-training run), or None.
- `read_state_dict(path, key)`: the four above, checked to be a dict of tensors.
- `mismatch(own, state)`: the missing / unexpected / wrong-shape keys of a strict load.
- `state_digest(state)`: a short fingerprint of a state dict's tensors (names, shapes, values).
- `stamp_run(checkpoint, config, method)`: what a later run reads besides the tensors: the run's
  config and where its backbone's weights started.
- `RenameTable`: the authors' tensor names <-> ours, as ordered prefix pairs, both directions.

Methods keep only their declarative rename tables (`RenameTable`, built from e.g. `PSP_STEM`), as
timm's checkpoint_filter_fn; a method declares its table in its contract (methods/base.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from fewshotseg.errors import ConfigError

# The PSPNet/PFENet/BAM stem (`layer0` = Sequential conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3,
# ...) -> timm's deep-stem names (resnet50s/resnet101s). The only copy of this map.
PSP_STEM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}

WRAPPERS = ("state_dict", "model", "model_state_dict", "state")
# Where this package's Lightning modules keep a Backbone's timm body (most specific first).
PACKAGE_BACKBONE_PREFIXES = (
    "method.backbone.body.",  # FewShotSegModule / SemanticModule (`self.method`), Backbone.body
    "encoder_k.backbone.body.",  # a pre-training run (GlobalLocalMoCo's key encoder)
    "encoder_k.backbone.net.",
)


def read(path: str | Path, key: str = "weights", missing: str = "no such file") -> object:
    """The object stored in `path` (weights only); ConfigError `{key}={path}: ...` if it is absent
    (`missing` is the rest of that message) or not a checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: {missing}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        first = (str(e).strip().splitlines() or [""])[0]  # torch's unpickler errors run to many lines
        raise ConfigError(
            f"{key}={path}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {first})"
        ) from e


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The first 8 hex digits of a sha256 over the tensors' names, dtypes, shapes and values, in
    name order: the same tensors give the same digest whatever file holds them (a .pth, or the
    package checkpoint they came from). Recorded with every result, since two files of one name
    (a backbone pre-trained again, on other software) can differ."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:8]


def stamp_run(checkpoint: dict, config: dict | None, method: object) -> None:
    """Into a run's checkpoint: its config (`fewshotseg_config`, what `evaluate ckpt=` rebuilds from)
    and where its backbone's weights started (`backbone_start`, e.g. `resnet18_synthetic.pth (sha256
    e2acd143)`): the run built the backbone from that file, a later run on the checkpoint does not."""
    if config is not None:
        checkpoint["fewshotseg_config"] = config
    checkpoint["backbone_start"] = getattr(getattr(method, "backbone", None), "start", None)


def unwrap(obj: object, wrappers: tuple[str, ...] = WRAPPERS) -> object:
    """The state dict inside (nested) checkpoint wrappers such as {'state_dict': ...}."""
    for wrapper in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    return obj


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """`prefix` removed from every key that has it (DataParallel/DDP's `module.` by default)."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def package_backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The Backbone tensors of one of this package's Lightning state dicts, by their body names
    (`conv1.0.weight`, `layer1.0...`), or None when `state` is not one."""
    for prefix in PACKAGE_BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return None


def unwrap_checked(obj: object, path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """`unwrap(obj)`, checked to be a dict of tensors (ConfigError naming `key=path` otherwise)."""
    state = unwrap(obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}={Path(path).expanduser()}: expected a state dict of tensors")
    return state


def read_state_dict(
    path: str | Path, key: str = "weights", missing: str = "no such file"
) -> dict[str, torch.Tensor]:
    """`read` + `unwrap_checked` + `strip_prefix('module.')`: a state dict of tensors."""
    return strip_prefix(unwrap_checked(read(path, key, missing), path, key))


class Mismatch(NamedTuple):
    """What a strict load of `state` into a module with state dict `own` would reject."""

    missing: list[str]  # own keys the state lacks
    unexpected: list[str]  # state keys the module lacks
    wrong: list[str]  # keys of both with other shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)


def mismatch(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ignore_bn_counts: bool = True
) -> Mismatch:
    """The strict-load report (in `own`'s / `state`'s order); BatchNorm's `num_batches_tracked`
    counters may be absent from the state when `ignore_bn_counts`."""
    return Mismatch(
        [k for k in own if k not in state and not (ignore_bn_counts and k.endswith("num_batches_tracked"))],
        [k for k in state if k not in own],
        [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
    )


def resnet_renames(ours: str, stem: Mapping[str, str], suffix: str = "") -> tuple[tuple[str, str], ...]:
    """(official, our) prefix pairs of the authors' ResNets: the stem is one Sequential
    `layer0{suffix}` whose index i is our `stem[i]`, the stages are `layer1{suffix}` .. `layer4{suffix}`;
    `ours` is where the timm body's names start (e.g. `backbone.body.`)."""
    pairs = [(f"layer0{suffix}.{idx}.", f"{ours}{name}.") for idx, name in stem.items()]
    return (*pairs, *((f"layer{i}{suffix}.", f"{ours}layer{i}.") for i in range(1, 5)))


@dataclass(frozen=True)
class RenameTable:
    """How the authors' released checkpoints name a method's tensors: ordered (official prefix, our
    prefix) pairs. A key is renamed by the first pair whose prefix it starts with (in either
    direction); a key no pair matches is a ConfigError listing it.

    name: the method, for messages. drop: official prefixes the model has no counterpart for, skipped
    when reading (ASGNet's layer4, built but never run). aliases: (alias, official) prefixes of tensors
    the authors' model registers twice (BAM's `encoder.<i>` = `layer<i>`): read where the official key
    is absent, written as well. unmapped: what the message says of keys with no counterpart.
    """

    name: str
    renames: tuple[tuple[str, str], ...]
    drop: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    unmapped: str = "have no counterpart"

    @staticmethod
    def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
        for old, new in pairs:
            if key.startswith(old):
                return new + key[len(old) :]
        return None

    def _error(self, where: str, what: str, keys: list[str]) -> ConfigError:
        more = " ..." if len(keys) > 20 else ""
        return ConfigError(f"{self.name} {where}: {len(keys)} key(s) {what}: {sorted(keys)[:20]}{more}")

    def to_ours(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' state dict (a `{'state_dict': ...}` wrapper and DataParallel's `module.`
        accepted) -> this package's names, every tensor kept, in the checkpoint's order."""
        state = strip_prefix(unwrap(dict(state), ("state_dict",)))
        named: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            official = self._rename(key, self.aliases)
            if official is not None and official in state:
                continue  # the duplicate registration of a tensor the checkpoint also holds by name
            named[official or key] = value
        out, unmapped = {}, []
        for key, value in named.items():
            if self.drop and key.startswith(self.drop):
                continue
            new = self._rename(key, self.renames)
            if new is None:
                unmapped.append(key)
            else:
                out[new] = value
        if unmapped:
            raise self._error("checkpoint", self.unmapped, unmapped)
        return out

    def to_official(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This package's state dict -> the authors' names (and their duplicate registrations)."""
        inverse = [(new, old) for old, new in self.renames]
        out, unmapped = {}, []
        for key, value in state.items():
            new = self._rename(key, inverse)
            if new is None:
                unmapped.append(key)
                continue
            out[new] = value
            alias = self._rename(new, [(old, alias) for alias, old in self.aliases])
            if alias is not None:
                out[alias] = value
        if unmapped:
            raise self._error("state dict", f"have no official {self.name} name", unmapped)
        return out
