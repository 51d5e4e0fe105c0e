"""Unlabeled images for QGNet's contrastive pre-training (`python -m fewshotseg.pretrain`).

Each item is one training image of the fold seen twice: two MoCo-v2 views (random resized crop,
colour jitter, grayscale, blur, flip; drawn independently) plus the image's superpixel map carried
through each view's *geometric* transform (nearest interpolation), so that superpixel id r names
the same image region in both views (docs/methods/qgnet.md).

- Images: the data group's source, fold and training split (`data.train_split`). Labels are never
  read: the ids come from the split's list. `exclude_novel_images=true` (the strict variant) reads
  the class index once, only to drop images that show a class outside the fold's base classes.
- Superpixels: SLIC (default) or Felzenszwalb from scikit-image, computed on the original image in
  the DataLoader workers and cached per image as .npy under the source's cache folder
  (`<data.root>/.fewshotseg_cache/superpixels/<method and parameters>/`), so later epochs read them.
  Ids are dense 0..n-1 (uint16); -1 in a view would mean "no region" (no geometric op here pads).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from fewshotseg.data.index import load_class_index
from fewshotseg.data.sampling import without_classes
from fewshotseg.data.sources.base import SegmentationSource
from fewshotseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fewshotseg.errors import ConfigError, DataError

SUPERPIXEL_METHODS = ("slic", "felzenszwalb")


# ------------------------------------------------------------------------------------------------
# Superpixels
# ------------------------------------------------------------------------------------------------


def compute_superpixels(
    image: np.ndarray,
    method: str = "slic",
    n_segments: int = 64,
    compactness: float = 10.0,
    scale: float = 100.0,
    sigma: float = 0.5,
    min_size: int = 50,
) -> np.ndarray:
    """Superpixel ids of an HxWx3 uint8 image: HxW uint16, dense 0..n-1.

    slic: `skimage.segmentation.slic(n_segments, compactness)` (QGNet's choice, docs/methods/qgnet.md);
    felzenszwalb: `felzenszwalb(scale, sigma, min_size)` (the paper's ablation)."""
    from skimage.segmentation import felzenszwalb, slic  # imported in the workers that need it

    if method == "slic":
        labels = slic(image, n_segments=n_segments, compactness=compactness, start_label=0)
    elif method == "felzenszwalb":
        labels = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
    else:
        raise ConfigError(f"superpixel.method={method!r}: expected one of {list(SUPERPIXEL_METHODS)}")
    _, dense = np.unique(labels, return_inverse=True)  # ids without gaps
    if dense.max() > np.iinfo(np.int16).max:  # views carry int16 maps
        raise DataError(f"{dense.max() + 1} superpixels in one image: at most 32768 are supported")
    return dense.reshape(labels.shape).astype(np.uint16)


class SuperpixelCache:
    """Superpixel maps computed once per image and kept as .npy files (atomic writes, so several
    workers or ranks may fill the cache at the same time)."""

    def __init__(self, folder: Path | None, method: str = "slic", **params):
        if method not in SUPERPIXEL_METHODS:
            raise ConfigError(f"superpixel.method={method!r}: expected one of {list(SUPERPIXEL_METHODS)}")
        used = ("n_segments", "compactness") if method == "slic" else ("scale", "sigma", "min_size")
        self.params = {"method": method, **{k: params[k] for k in used if k in params}}
        tag = json.dumps(self.params, sort_keys=True)
        name = f"{method}_{hashlib.sha1(tag.encode()).hexdigest()[:8]}"
        self.folder = Path(folder) / name if folder is not None else None  # None: no cache
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "params.json").write_text(tag)

    def path(self, image_id: str) -> Path:
        safe = image_id.replace(os.sep, "__").replace("/", "__")
        return self.folder / f"{safe}.npy"

    def __call__(self, image_id: str, image: np.ndarray) -> np.ndarray:
        path = self.path(image_id) if self.folder is not None else None
        if path is not None and path.is_file():
            try:
                cached = np.load(path)
                if cached.shape == image.shape[:2]:
                    return cached
            except (OSError, ValueError):
                pass  # a damaged file is recomputed
        regions = compute_superpixels(image, **self.params)
        if path is not None:
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npy")
            np.save(tmp, regions)
            os.replace(tmp, path)
        return regions


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


class ViewTransform:
    """One MoCo-v2 view of (image, superpixel map): HxWx3 uint8, HxW uint16 -> ([3,S,S] float
    normalised, [S,S] int16 region ids). Geometric ops (random resized crop, horizontal flip) move
    the map with the image, with nearest interpolation; colour ops touch the image only. Each call
    draws new parameters, so two calls give two independent views."""

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_p: float = 0.5,
        flip_p: float = 0.5,
    ):
        b, c, s, h = jitter
        self.pipeline = A.Compose(
            [
                A.RandomResizedCrop((size, size), scale=tuple(scale), ratio=tuple(ratio),
                                    interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
                # geometric ops first (MoCo-v2 flips last; flips commute with these colour ops), so
                # a view's geometry does not depend on which colour ops were drawn
                A.HorizontalFlip(p=flip_p),
                A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=jitter_p),
                A.ToGray(p=gray_p),
                # blur_limit=0: the kernel follows sigma (MoCo-v2's PIL blur with radius sigma)
                A.GaussianBlur(blur_limit=0, sigma_limit=tuple(blur_sigma), p=blur_p),
                A.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )  # fmt: skip

    def set_seed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray, regions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.pipeline(image=image, mask=regions)
        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32))
        return img, torch.from_numpy(out["mask"].astype(np.int16))  # int16: a quarter of int64 to collate


# ------------------------------------------------------------------------------------------------
# Dataset and datamodule
# ------------------------------------------------------------------------------------------------


class UnlabeledImages(Dataset):
    """Item: {"view1", "view2": [3,S,S] float, "regions1", "regions2": [S,S] int16, "index": int}."""

    def __init__(
        self,
        source: SegmentationSource,
        image_ids: list[str],
        views: ViewTransform,
        superpixels: Callable[[str, np.ndarray], np.ndarray],
    ):
        self.source, self.image_ids, self.views, self.superpixels = source, image_ids, views, superpixels

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.image_ids[i]
        image = self.source.load_image(image_id)
        regions = self.superpixels(image_id, image)
        # Torch's RNG is seeded per worker (seed_everything(workers=True)): reproducible views.
        self.views.set_seed(int(torch.randint(0, 2**31, ()).item()))
        view1, regions1 = self.views(image, regions)
        view2, regions2 = self.views(image, regions)
        return {"view1": view1, "view2": view2, "regions1": regions1, "regions2": regions2, "index": i}


class UnlabeledDataModule(LightningDataModule):
    """The fold's training images without their labels, as pairs of views with superpixel maps.

    `root`, `source`, `fold`, `num_folds`, `fold_split` and `split` are the data group's
    (conf/pretrain.yaml interpolates them), so `data=pascal fold=2` picks the same images that
    `fewshotseg.train` trains on, novel-class objects included (unlabeled; docs/methods/qgnet.md leakage
    note) unless `exclude_novel_images=true`."""

    def __init__(
        self,
        root: str,
        source: Callable[..., SegmentationSource],
        fold: int = 0,
        num_folds: int = 4,
        fold_split: str = "consecutive",
        split: str = "train",
        exclude_novel_images: bool = False,
        views: ViewTransform | None = None,
        superpixel: dict | None = None,
        cache_superpixels: bool = True,
        batch_size: int = 256,
        num_workers: int = 4,
    ):
        super().__init__()
        self.source = source(root=root)
        classes = self.source.class_split(fold, num_folds, fold_split)  # validates fold
        self.base, self.novel = classes.train, classes.test
        self.fold, self.split, self.exclude_novel_images = fold, split, exclude_novel_images
        self.views = views or ViewTransform()
        self.superpixel = dict(superpixel or {"method": "slic", "n_segments": 64, "compactness": 10.0})
        SuperpixelCache(None, **self.superpixel)  # validates the method now, not in a worker
        self.cache_superpixels = cache_superpixels
        self.batch_size, self.num_workers = batch_size, num_workers
        if batch_size < 1:
            raise ConfigError(f"unlabeled.batch_size={batch_size}: expected an integer >= 1")

    def image_ids(self) -> list[str]:
        """The split's image ids from its list; with exclude_novel_images, those whose label shows
        only base classes (the one place a label is read, through the cached class index)."""
        ids = list(dict.fromkeys(self.source.image_ids(self.split)))
        if self.exclude_novel_images:
            keep = without_classes(load_class_index(self.source, self.split), self.base)
            ids = [i for i in ids if i in keep]
        return ids

    def prepare_data(self) -> None:
        self.source.prepare()  # rank 0: generate / check the data (and build the class index if needed)
        if self.exclude_novel_images:
            load_class_index(self.source, self.split)

    def setup(self, stage: str | None = None) -> None:
        ids = self.image_ids()
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(ids) < self.batch_size * world:
            raise ConfigError(
                f"unlabeled.batch_size={self.batch_size} x {world} device(s) is more than the "
                f"{len(ids)} training images of {self.source.name} fold {self.fold}: lower the batch size"
            )
        cache = self.source.cache_dir() / "superpixels" if self.cache_superpixels else None
        self.train_set = UnlabeledImages(
            self.source, ids, self.views, SuperpixelCache(cache, **self.superpixel)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
