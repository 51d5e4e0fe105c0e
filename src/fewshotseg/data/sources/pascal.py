"""PASCAL VOC layout: JPEGImages/, SegmentationClassAug/ and list files.

The same reader serves PASCAL-5i and the built-in synthetic benchmark, which is written in this
layout. PASCAL-5i's training images, unless a list file is given (PFENet, HSNet or BAM lists are
read as they are, see lists.py):
- train_images=voc_sbd (default, PFENet/OSLSM): the VOC 2012 `train` ids plus the SBD `train_noval`
  ids (SBD training images that are not VOC 2012 val images), each id once. This is how PFENet's
  5,953-image `voc_sbd_merge_noduplicate.txt` was made. The SBD id list is
  http://home.bharathh.info/pubs/codes/SBD/train_noval.txt (SBD's own `dataset/train.txt` gives the
  same set: VOC val ids are removed here in any case).
- train_images=all: every label in SegmentationClassAug whose id is not in the val list (the
  usual 10,582-image "trainaug" set with the standard SegmentationClassAug download).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fewshotseg.data.lists import ListEntries, read_list
from fewshotseg.data.sources.base import (
    SegmentationSource,
    check_choice,
    check_root,
    files_fingerprint,
    read_image,
    read_label,
    require_dir,
    resolve_path,
)
from fewshotseg.errors import DataError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

VOC_LAYOUT_HELP = (
    "expected the PASCAL VOC layout: <root>/JPEGImages/<id>.jpg, <root>/SegmentationClassAug/<id>.png "
    "and one id per line in <root>/ImageSets/Segmentation/<split>.txt"
)
SBD_HELP = (
    "the SBD training ids: wget http://home.bharathh.info/pubs/codes/SBD/train_noval.txt "
    "-O <root>/ImageSets/Segmentation/sbd_train_noval.txt; or set data.source.train_images=all (every "
    "SegmentationClassAug label not in the val list), or data.source.train_list=<a PFENet/HSNet/BAM list>"
)


class VOCLayoutSource(SegmentationSource):
    """Images `<image_dir>/<id>.jpg`, labels `<label_dir>/<id>.png`, splits from list files.

    `splits` maps a split name to a list file (relative to `list_dir`, or absolute) in any format
    lists.py reads; PFENet lines that name other folders are followed as written.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: list[str] | None = None,
        splits: dict[str, str] | None = None,
        image_dir: str = "JPEGImages",
        label_dir: str = "SegmentationClassAug",
        list_dir: str = "ImageSets/Segmentation",
        name: str = "pascal",
    ):
        self.root = Path(root).expanduser()
        self.class_names = list(class_names or VOC_CLASSES)
        self.splits = dict(splits or {"train": "train.txt", "val": "val.txt"})
        self.image_dir = self.root / image_dir
        self.label_dir = self.root / label_dir
        self.list_dir = self.root / list_dir
        self.name = name
        self._entries_cache: dict[str, ListEntries] = {}
        self._paths: dict[str, tuple[Path, Path]] = {}

    def prepare(self) -> None:
        check_root(self.root, self.name, VOC_LAYOUT_HELP)
        require_dir(self.image_dir, "images", VOC_LAYOUT_HELP)
        require_dir(self.label_dir, "labels", VOC_LAYOUT_HELP)

    # --- lists -------------------------------------------------------------------------------
    def _list_path(self, split: str) -> Path:
        if split not in self.splits:
            raise DataError(f"unknown split {split!r} for {self.name}: expected one of {sorted(self.splits)}")
        path = self.list_dir / self.splits[split]
        if not path.exists():
            raise DataError(f"missing list file {path}: {VOC_LAYOUT_HELP}")
        return path

    def _read_entries(self, split: str) -> ListEntries:
        return read_list(self._list_path(split))

    def split_entries(self, split: str) -> ListEntries:
        if split not in self._entries_cache:
            entries = self._read_entries(split)
            for image_id, (image, label) in entries.paths.items():
                if label is not None:  # PFENet lines: follow the folders they name
                    self._paths[image_id] = (resolve_path(self.root, image), resolve_path(self.root, label))
            self._entries_cache[split] = entries
        return self._entries_cache[split]

    # --- files -------------------------------------------------------------------------------
    def _files(self, image_id: str) -> tuple[Path, Path]:
        if image_id in self._paths:
            return self._paths[image_id]
        return self.image_dir / f"{image_id}.jpg", self.label_dir / f"{image_id}.png"

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self._files(image_id)[0])

    def load_label(self, image_id: str) -> np.ndarray:
        return read_label(self._files(image_id)[1], self.num_classes)

    def fingerprint(self, split: str) -> str:
        ids = self.image_ids(split)
        pairs = self.split_pairs(split) or {}
        seed = "\n".join(f"{i}:{sorted(pairs.get(i, ()))}" for i in ids).encode()
        return files_fingerprint(seed, [self._files(i)[1] for i in ids])


class PascalVOC(VOCLayoutSource):
    """PASCAL VOC 2012 with SBD-augmented labels (SegmentationClassAug).

    train_list / val_list: a list file or folder (lists.py formats), absolute or relative to the data
    root; train_list=None derives the training ids as `train_images` says (module docstring).
    """

    def __init__(
        self,
        root: str | Path,
        train_list: str | None = None,
        val_list: str = "ImageSets/Segmentation/val.txt",
        train_images: str = "voc_sbd",
        voc_train_list: str = "ImageSets/Segmentation/train.txt",
        sbd_list: str = "ImageSets/Segmentation/sbd_train_noval.txt",
    ):
        super().__init__(root, VOC_CLASSES, {"train": train_list or "", "val": val_list}, name="pascal")
        self.train_list = train_list
        self.train_images = check_choice("data.source.train_images", train_images, ("voc_sbd", "all"))
        self.voc_train_list, self.sbd_list = voc_train_list, sbd_list

    def _list_path(self, split: str) -> Path:
        if split not in self.splits:
            raise DataError(f"unknown split {split!r} for pascal: expected 'train' or 'val'")
        path = resolve_path(self.root, self.splits[split])
        if not path.exists():
            what = "data.source.train_list" if split == "train" else "data.source.val_list"
            raise DataError(f"missing list file {path} ({what}): {VOC_LAYOUT_HELP}")
        return path

    def _read_entries(self, split: str) -> ListEntries:
        if split != "train" or self.train_list:
            return read_list(self._list_path(split))
        val_ids = set(self.image_ids("val"))
        out = ListEntries()
        if self.train_images == "all":
            if not self.label_dir.is_dir():
                raise DataError(f"missing folder {self.label_dir}: {VOC_LAYOUT_HELP}")
            for p in sorted(self.label_dir.glob("*.png")):
                if p.stem not in val_ids:
                    out.add(p.stem)
            return out
        voc = resolve_path(self.root, self.voc_train_list)
        sbd = resolve_path(self.root, self.sbd_list)
        if not voc.is_file():
            raise DataError(
                f"missing list file {voc} (the VOC 2012 train ids, part of the VOC devkit): {VOC_LAYOUT_HELP}"
            )
        if not sbd.is_file():
            raise DataError(f"missing list file {sbd} ({SBD_HELP})")
        for image_id in read_list(voc).ids + read_list(sbd).ids:
            if image_id not in val_ids:  # VOC val is the test set: never train on it
                out.add(image_id)
        return out
