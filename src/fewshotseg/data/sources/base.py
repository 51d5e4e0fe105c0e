"""A dataset source: where images and labels are and how to read them.

Sources know nothing about episodes. They answer four questions: which images a split holds
(`image_ids`), which classes an image contains with how many pixels (`class_areas`, the class
index is built from it), the image (`load_image`) and its mask for one class (`load_mask`: 1 = the
class, 0 = anything else, 255 = ignore). Sources with a semantic label map (VOC, COCO, own folders
of indexed PNGs) implement `load_label` (HxW uint8: 0 background, 1..N classes, 255 ignore) and
get `class_areas` and `load_mask` from it. They also say which classes are novel in a fold
(`class_split`): the arithmetic folds of folds.py unless the dataset defines its own (FSS-1000).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fewshotseg.data.episode import IGNORE_INDEX
from fewshotseg.data.folds import base_classes, fold_classes
from fewshotseg.data.lists import ListEntries
from fewshotseg.errors import ConfigError, DataError


def binarise(label: np.ndarray, class_id: int) -> np.ndarray:
    """1 = the episode's class, 255 = ignore, 0 = everything else (other and novel classes too)."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def base_labels(label: np.ndarray, base: list[int]) -> np.ndarray:
    """BAM's base-class label (`get_mulway_base_data.py`, `label_b`): the i-th class of `base`
    (ascending class ids) -> i + 1, every other class (novel) -> 0, 255 kept."""
    lut = np.zeros(256, np.uint8)
    lut[np.asarray(sorted(base), dtype=np.int64)] = np.arange(1, len(base) + 1, dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[label]


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path} (corrupt or not an image?): {e}") from e


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """Read an indexed PNG label and check its values are 0..num_classes or 255."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I;16", "I"):
                raise DataError(
                    f"label {path} has mode {im.mode!r}: expected a single-channel PNG of class ids"
                )
            label = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"label file not found: {path} (every image needs a label)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read label {path} (corrupt or not a PNG?): {e}") from e
    bad = (label > num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))[:10]
        raise DataError(
            f"label {path} has values {values} outside the class list: expected 0..{num_classes} or 255"
        )
    return label.astype(np.uint8)


def read_binary_mask(path: Path) -> np.ndarray:
    """A black/white mask (FSS-1000, one mask per class): 1 where the grey value is >= 128."""
    try:
        with Image.open(path) as im:
            return (np.asarray(im.convert("L")) >= 128).astype(np.uint8)
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path} (every image needs a mask)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read mask {path} (corrupt or not an image?): {e}") from e


def label_areas(label: np.ndarray, num_classes: int) -> dict[int, int]:
    """{class id: pixel count} of the classes present in a label map."""
    counts = np.bincount(label.ravel(), minlength=256)
    return {c: int(counts[c]) for c in range(1, num_classes + 1) if counts[c] > 0}


def files_fingerprint(seed: bytes, paths: list[Path]) -> str:
    """A digest of `seed` and the size and modification time of every file (missing ones too)."""
    h = hashlib.sha1(seed)
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        except FileNotFoundError:
            h.update(f"{p.name}:missing;".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ClassSplit:
    """Class ids used for training, for validation episodes and for test episodes."""

    train: list[int]
    val: list[int]
    test: list[int]


class SegmentationSource:
    """Base class: subclasses set `name`, `root`, `class_names` and implement the readers."""

    name: str = "source"
    root: Path
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare(self) -> None:
        """Make the data available (generate it, check the layout). Called once, on rank 0."""

    def split_entries(self, split: str) -> ListEntries:
        """The split's list (image ids, and the classes each may be used for): sources built on
        list files implement this and inherit `image_ids` and `split_pairs`."""
        raise NotImplementedError

    def image_ids(self, split: str) -> list[str]:
        return self.split_entries(split).ids

    def load_image(self, image_id: str) -> np.ndarray:
        raise NotImplementedError

    def load_label(self, image_id: str) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no semantic label maps; use load_mask")

    def load_mask(self, image_id: str, class_id: int) -> np.ndarray:
        """HxW uint8: 1 = `class_id`, 0 = anything else, 255 = ignore."""
        return binarise(self.load_label(image_id), class_id)

    def class_areas(self, image_id: str) -> dict[int, int]:
        """{class id: pixels at original resolution} of the classes in the image (the index entry)."""
        return label_areas(self.load_label(image_id), self.num_classes)

    def build_index(self, split: str, num_workers: int | None) -> dict[str, dict[int, int]] | None:
        """The whole class index at once, for sources that can do better than reading every label
        (COCO: from the annotation file). None: index.py reads `class_areas` image by image."""
        return None

    def split_pairs(self, split: str) -> dict[str, set[int]] | None:
        """For list files that name (image, class) pairs (HSNet, BAM): the classes each image may be
        used for. None: every class present in an image may be used."""
        try:
            return self.split_entries(split).classes
        except NotImplementedError:
            return None

    def fingerprint(self, split: str) -> str:
        """Changes whenever the split's list or label files change (invalidates caches)."""
        raise NotImplementedError

    def class_split(self, fold: int, num_folds: int, fold_split: str) -> ClassSplit:
        """Fold i's novel classes are tested (and validated) on; the others are trained on."""
        novel = fold_classes(self.num_classes, num_folds, fold, fold_split)  # validates fold
        return ClassSplit(base_classes(self.num_classes, num_folds, fold, fold_split), novel, novel)

    def cache_dir(self) -> Path:
        """Where indexes and episode lists go: next to the data, or the user cache if read-only."""
        local = self.root / ".fewshotseg_cache"
        try:
            local.mkdir(parents=True, exist_ok=True)
            if os.access(local, os.W_OK):
                return local
        except OSError:
            pass
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:10]
        fallback = (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            / "fewshotseg"
            / f"{self.name}-{digest}"
        )
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def require_dir(path: Path, what: str, help_text: str) -> None:
    if not path.is_dir():
        raise DataError(f"missing folder {path} ({what}): {help_text}")


def require_file(path: Path, what: str, help_text: str) -> None:
    if not path.is_file():
        raise DataError(f"missing file {path} ({what}): {help_text}")


def check_root(root: Path, name: str, help_text: str) -> None:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: {help_text} (set data.root=... for {name})")


def resolve_path(root: Path, path: str | Path) -> Path:
    """A path from the config: absolute, or relative to the data root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {list(choices)}")
    return value
