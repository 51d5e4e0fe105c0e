"""The synthetic pre-training corpus: what ImageNet is to PASCAL, for the built-in benchmark.

The benchmark has 20 classes, each one (shape, texture, colour) combination of its generator. The
corpus draws from *every* combination: 10 shapes x 6 textures x 20 colours (10 hue families, bright
and dark) = 1200 categories, the benchmark's 20 among them as PASCAL's 20 are among ImageNet's
1000. Images are rendered by the benchmark's own generator (same backgrounds, object sizes, jitter
and noise, 1 to 3 objects), from random streams of their own, so no corpus image is a benchmark
image. `exclude_fold=k` leaves out fold k's five novel classes (1195 categories): the strict
variant, for a backbone that has never seen a test class even as a combination.

Labels are dense and factorised: a 3-channel PNG whose channels hold each pixel's shape (1..10),
texture (1..6) and colour (1..20); 0 is background, 255 the ignore band along outlines. A
category is the triple, so a per-pixel classifier of the three attributes recognises all 1200
while each attribute head sees thousands of examples per epoch (a 1200-way head would see a dozen
per category in the 15-minute budget).

Layout under ``root``::

    images/{split}_{i:06d}.jpg     RGB JPEG, quality 95
    labels/{split}_{i:06d}.png     RGB PNG: shape, texture, colour ids (0 background, 255 ignore)
    train.txt, val.txt             the ids
    corpus.json                    generation parameters and the category table; written last
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fewshotseg.data.folds import fold_classes
from fewshotseg.data.sources.synthetic_gen import (
    _CLASS_TABLE,
    HUES,
    IGNORE_INDEX,
    SHAPES,
    TEXTURES,
    _default_workers,
    build_once,
    outline,
    render_objects,
)
from fewshotseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fewshotseg.errors import DataError

log = logging.getLogger(__name__)

VERSION = 1  # bump when the bytes of any written file change
MARKER = "corpus.json"
MANAGED = ("images", "labels", "train.txt", "val.txt")
SPLIT_CODES = {"train": 10, "val": 11}  # disjoint from the benchmark's streams (0, 1)
ATTRIBUTES = ("shape", "texture", "colour")
COLOURS = tuple(("dark " if dark else "") + name for name, _ in HUES for dark in (False, True))
NUM_VALUES = {"shape": len(SHAPES), "texture": len(TEXTURES), "colour": len(COLOURS)}
_CHUNK = 32

Category = tuple[int, int, int, bool]  # shape, texture, hue family, dark: a row of the benchmark's table
ALL_CATEGORIES: tuple[Category, ...] = tuple(
    (shape, texture, hue, dark)
    for shape in range(len(SHAPES))
    for texture in range(len(TEXTURES))
    for hue in range(len(HUES))
    for dark in (False, True)
)


def categories(exclude_fold: int | None = None) -> tuple[Category, ...]:
    """The corpus's categories: all 1200, or all but the benchmark's novel classes of `exclude_fold`."""
    if exclude_fold is None:
        return ALL_CATEGORIES
    novel = {_CLASS_TABLE[c - 1] for c in fold_classes(len(_CLASS_TABLE), 4, int(exclude_fold))}
    return tuple(c for c in ALL_CATEGORIES if c not in novel)


def category_name(category: Category) -> str:
    shape, texture, hue, dark = category
    return f"{COLOURS[2 * hue + dark]} {TEXTURES[texture]} {SHAPES[shape]}"


def attribute_label(label: np.ndarray, table: tuple[Category, ...]) -> np.ndarray:
    """HxW category label (row + 1, 0 background) -> HxWx3 uint8 attribute ids with the ignore band."""
    lookup = np.zeros((len(table) + 1, 3), dtype=np.uint8)
    for row, (shape, texture, hue, dark) in enumerate(table, start=1):
        lookup[row] = (shape + 1, texture + 1, 2 * hue + dark + 1)
    out = lookup[label]
    out[outline(label)] = IGNORE_INDEX
    return out


def render_corpus_sample(
    seed: int, split: str, index: int, image_size: int, table: tuple[Category, ...] = ALL_CATEGORIES
) -> tuple[np.ndarray, np.ndarray]:
    """One corpus image in memory: (HxWx3 uint8 image, HxWx3 uint8 attribute label)."""
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    image, label = render_objects(rng, int(image_size), table)
    return image, attribute_label(label, table)


def _write_chunk(out: str, seed: int, split: str, start: int, stop: int, size: int, exclude_fold) -> None:
    table = categories(exclude_fold)
    for index in range(start, stop):
        image, label = render_corpus_sample(seed, split, index, size, table)
        name = f"{split}_{index:06d}"
        Image.fromarray(image).save(f"{out}/images/{name}.jpg", quality=95, subsampling=0)
        Image.fromarray(label).save(f"{out}/labels/{name}.png")


def generate_corpus(
    root: str | pathlib.Path,
    *,
    seed: int = 0,
    num_train: int = 8000,
    num_val: int = 400,
    image_size: int = 128,
    exclude_fold: int | None = None,
    num_workers: int | None = None,
) -> pathlib.Path:
    """Write the corpus under `root` once (a second call with the same parameters returns at once)."""
    root = pathlib.Path(root).expanduser().absolute()
    table = categories(exclude_fold)
    params = {"version": VERSION, "seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "exclude_fold": exclude_fold}  # fmt: skip
    workers = min(_default_workers() if num_workers is None else int(num_workers), 8)

    def build(tmp: pathlib.Path) -> None:
        t0 = time.perf_counter()
        log.info("Generating the pre-training corpus (%d categories, %d + %d images, %d px) in %s",
                 len(table), num_train, num_val, image_size, root)  # fmt: skip
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        tasks = [(str(tmp), seed, split, start, min(start + _CHUNK, n), image_size, exclude_fold)
                 for split, n in (("train", num_train), ("val", num_val)) for start in range(0, n, _CHUNK)]  # fmt: skip
        if workers <= 1 or mp.current_process().daemon:
            for task in tasks:
                _write_chunk(*task)
        else:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for future in [pool.submit(_write_chunk, *task) for task in tasks]:
                    future.result()
        for split, n in (("train", num_train), ("val", num_val)):
            (tmp / f"{split}.txt").write_text("".join(f"{split}_{i:06d}\n" for i in range(n)))
        meta = dict(params, attributes={"shape": SHAPES, "texture": TEXTURES, "colour": COLOURS},
                    num_categories=len(table), categories=[category_name(c) for c in table])  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        log.info("Pre-training corpus ready in %.1fs", time.perf_counter() - t0)

    build_once(root, params, build, marker=MARKER, managed=MANAGED, what="a pre-training corpus")
    return root


class CorpusDataset(Dataset):
    """Items {"image": [3,H,W] float (ImageNet-normalised), "label": [3,H,W] long attribute ids}."""

    def __init__(self, root: str | pathlib.Path, split: str, flip: bool = False):
        self.root, self.flip = pathlib.Path(root), flip
        ids = self.root / f"{split}.txt"
        if not ids.is_file():
            raise DataError(f"{ids}: no such file (generate the corpus with generate_corpus)")
        self.ids = ids.read_text().split()
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        name = self.ids[i]
        try:
            image = np.asarray(Image.open(self.root / "images" / f"{name}.jpg").convert("RGB"))
            label = np.asarray(Image.open(self.root / "labels" / f"{name}.png").convert("RGB"))
        except OSError as e:
            raise DataError(f"{self.root}: cannot read corpus image {name} ({e})") from e
        image = torch.from_numpy(image.copy()).permute(2, 0, 1).float()
        label = torch.from_numpy(label.copy()).permute(2, 0, 1).long()
        if self.flip and torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": (image - self.mean) / self.std, "label": label}


class CorpusDataModule(LightningDataModule):
    """The corpus's train and val splits, generated on first use."""

    def __init__(self, root: str, generation: dict, batch_size: int = 16, num_workers: int = 2):
        super().__init__()
        self.root, self.generation = root, dict(generation)
        self.batch_size, self.num_workers = batch_size, num_workers

    def prepare_data(self) -> None:
        generate_corpus(self.root, **self.generation)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = CorpusDataset(self.root, "train", flip=True)
        self.val_set = CorpusDataset(self.root, "val")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
