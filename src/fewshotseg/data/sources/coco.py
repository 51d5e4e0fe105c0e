"""COCO-20i from the standard COCO layout, read through pycocotools (no pre-converted PNGs needed).

    <root>/train2014/COCO_train2014_<id>.jpg, <root>/val2014/COCO_val2014_<id>.jpg
    <root>/annotations/instances_train2014.json, <root>/annotations/instances_val2014.json

Classes are the contiguous ids 1..80 of the 80 category ids sorted ascending (person = 1 ...
toothbrush = 80), as in every few-shot code base. An image is an image id of the split that has at
least one annotation (this gives PFENet's 82,081 / 40,137 list lengths).

Label rule (labels=json): the semantic label of an image paints its instance masks (polygons and
RLE, decoded by pycocotools at the image's resolution) in decreasing order of the annotation's
`area` field, ties by annotation id, so a smaller object lying on a larger one stays visible and the
rule does not depend on the order of the JSON file. Crowd regions (iscrowd=1) are painted like any
instance with their class (crowd=foreground, as PANet builds its COCO masks) or with 255
(crowd=ignore).

The first use of a split converts its JSON once (coco_json.py, in parallel) into a compact store in
the cache folder: the instance masks as compressed RLE in paint order, plus each class's *visible*
pixel count per image, computed exactly on RLEs. The class index comes from these counts without
decoding a single mask, so the 2048-pixel rule counts the pixels of the painted label at original
resolution. Labels are then decoded image by image from the memory-mapped store.

labels=png reads per-image label PNGs with the contiguous ids instead (PFENet's coco_parse_script
output or HSNet's annotations/train2014/*.png), from `label_dirs` or from PFENet list lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
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
    require_file,
    resolve_path,
)
from fewshotseg.data.sources.coco_json import convert
from fewshotseg.errors import DataError

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

COCO_LAYOUT_HELP = (
    "expected the COCO {year} layout: <root>/train{year}/*.jpg, <root>/val{year}/*.jpg and "
    "<root>/annotations/instances_{{train,val}}{year}.json (https://cocodataset.org/#download: "
    "train{year}.zip, val{year}.zip, annotations_trainval{year}.zip)"
)
_STORE_VERSION = 1


class COCO20i(SegmentationSource):
    def __init__(
        self,
        root: str | Path,
        labels: str = "json",
        crowd: str = "foreground",
        year: int = 2014,
        train_list: str | None = None,
        val_list: str | None = None,
        label_dirs: dict[str, str] | None = None,
    ):
        self.root = Path(root).expanduser()
        self.name = "coco"
        self.class_names = list(COCO_CLASSES)
        self.labels = check_choice("data.source.labels", labels, ("json", "png"))
        self.crowd = check_choice("data.source.crowd", crowd, ("foreground", "ignore"))
        self.year = int(year)
        self.lists = {"train": train_list, "val": val_list}
        self.label_dirs = dict(label_dirs or {s: f"annotations/{s}{self.year}" for s in ("train", "val")})
        self.help = COCO_LAYOUT_HELP.format(year=self.year)
        self._entries: dict[str, ListEntries] = {}
        self._stores: dict[str, dict] = {}
        self._rows: dict[str, tuple[str, int]] = {}
        self._png_paths: dict[str, tuple[Path, Path]] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers re-open the memory-mapped store instead of receiving a copy of it
        return {**self.__dict__, "_stores": {}, "_rows": {}}

    def _check_split(self, split: str) -> None:
        if split not in ("train", "val"):
            raise DataError(f"unknown split {split!r} for COCO: expected 'train' or 'val'")

    def _json(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}{self.year}.json"

    def prepare(self) -> None:
        check_root(self.root, self.name, self.help)
        for split in ("train", "val"):
            if not (self.root / f"{split}{self.year}").is_dir():
                raise DataError(
                    f"missing folder {self.root / f'{split}{self.year}'} (COCO {split} images): {self.help}"
                )
            if self.labels == "json":
                require_file(self._json(split), f"COCO {split} annotations", self.help)

    # --- image lists ----------------------------------------------------------------------------
    def split_entries(self, split: str) -> ListEntries:
        self._check_split(split)
        if split in self._entries:
            return self._entries[split]
        if self.lists[split]:
            entries = read_list(resolve_path(self.root, self.lists[split]))
        elif self.labels == "json":
            entries = ListEntries()
            for image_id in self._store(split)["ids"]:
                entries.add(image_id)
        else:
            label_dir = resolve_path(self.root, self.label_dirs[split])
            if not label_dir.is_dir():
                raise DataError(f"missing folder {label_dir} (COCO {split} label PNGs, data.source.label_dirs.{split}): "
                                "expected <stem>.png label maps with class ids 1..80, or give data.source.labels=json")  # fmt: skip
            entries = ListEntries()
            for p in sorted(label_dir.glob("*.png")):
                entries.add(p.stem)
        if self.labels == "png":
            for image_id in entries.ids:
                image, label = entries.paths.get(image_id, (None, None))
                self._png_paths[image_id] = (
                    resolve_path(self.root, image)
                    if image
                    else self.root / f"{split}{self.year}" / f"{image_id}.jpg",
                    resolve_path(self.root, label)
                    if label
                    else resolve_path(self.root, self.label_dirs[split]) / f"{image_id}.png",
                )
        self._entries[split] = entries
        return entries

    def split_pairs(self, split: str) -> dict[str, set[int]] | None:
        self._check_split(split)
        return self.split_entries(split).classes if self.lists[split] else None

    # --- the converted annotation store (labels=json) --------------------------------------------
    def _store_fingerprint(self, split: str) -> str:
        path = self._json(split)
        require_file(path, f"COCO {split} annotations", self.help)
        st = path.stat()
        return f"v{_STORE_VERSION}:{self.crowd}:{path.name}:{st.st_size}:{st.st_mtime_ns}"

    def _store_dir(self, split: str) -> Path:
        digest = hashlib.sha1(self._store_fingerprint(split).encode()).hexdigest()[:12]
        return self.cache_dir() / f"coco_{split}{self.year}_{digest}"

    def _store(self, split: str, num_workers: int | None = None) -> dict:
        if split not in self._stores:
            folder = self._store_dir(split)
            if not (folder / "meta.json").is_file():
                self._build_store(split, folder, num_workers)
            meta = json.loads((folder / "meta.json").read_text())
            arrays = {
                k: np.load(folder / f"{k}.npy", mmap_mode="r")
                for k in ("inst_start", "inst_value", "rle_start", "rle_bytes")
            }
            self._stores[split] = {**meta, **arrays}
            for row, image_id in enumerate(meta["ids"]):
                self._rows[image_id] = (split, row)
        return self._stores[split]

    def _build_store(self, split: str, folder: Path, num_workers: int | None) -> None:
        path = self._json(split)
        print(
            f"fewshotseg: converting {path} (once; later runs read the copy in {folder.parent})",
            file=sys.stderr,
        )
        images, per_image = convert(path, num_workers, self.crowd, COCO_CLASSES)
        self._write_store(folder, split, images, per_image)

    def _write_store(self, folder: Path, split: str, images: list[dict], results: list) -> None:
        counts = [r[0] for r in results]
        inst_start = np.zeros(len(images) + 1, np.int64)
        inst_start[1:] = np.cumsum([len(c) for c in counts])
        flat = [c for cs in counts for c in cs]
        rle_start = np.zeros(len(flat) + 1, np.int64)
        rle_start[1:] = np.cumsum([len(c) for c in flat])
        meta = {
            "fingerprint": self._store_fingerprint(split),
            "ids": [Path(im["file_name"]).stem for im in images],
            "files": [im["file_name"] for im in images],
            "sizes": [[im["height"], im["width"]] for im in images],
        }
        tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        np.save(tmp / "inst_start.npy", inst_start)
        np.save(tmp / "inst_value.npy", np.array([v for r in results for v in r[1]], np.uint8))
        np.save(tmp / "rle_start.npy", rle_start)
        np.save(tmp / "rle_bytes.npy", np.frombuffer(b"".join(flat), np.uint8))
        (tmp / "areas.json").write_text(json.dumps([r[2] for r in results]))  # the class index, per image
        (tmp / "meta.json").write_text(json.dumps(meta))  # last: marks the store complete
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same store first
            shutil.rmtree(tmp, ignore_errors=True)
        for old in folder.parent.glob(f"coco_{split}{self.year}_*"):
            if old != folder and ".tmp-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)

    def build_index(self, split: str, num_workers: int | None) -> dict[str, dict[int, int]] | None:
        if self.labels != "json":
            return None
        store = self._store(split, num_workers)
        per_image = json.loads((self._store_dir(split) / "areas.json").read_text())
        areas = {i: {int(c): a for c, a in ar.items()} for i, ar in zip(store["ids"], per_image)}
        ids = self.image_ids(split)
        missing = [i for i in ids if i not in areas]
        if missing:
            raise DataError(
                f"the {split} list names {len(missing)} images without annotations in {self._json(split)}, e.g. {missing[:3]}"
            )
        return {i: areas[i] for i in ids}

    def _locate(self, image_id: str) -> tuple[str, int]:
        if image_id not in self._rows:
            guess = sorted(("train", "val"), key=lambda s: f"{s}{self.year}" not in image_id)
            for split in guess:
                self._store(split)
                if image_id in self._rows:
                    break
            else:
                raise DataError(
                    f"no COCO image {image_id!r} with annotations in {self._json('train')} or {self._json('val')}"
                )
        return self._rows[image_id]

    # --- files ---------------------------------------------------------------------------------
    def load_image(self, image_id: str) -> np.ndarray:
        if self.labels == "png":
            return read_image(self._png_files(image_id)[0])
        split, row = self._locate(image_id)
        return read_image(self.root / f"{split}{self.year}" / self._stores[split]["files"][row])

    def load_label(self, image_id: str) -> np.ndarray:
        if self.labels == "png":
            return read_label(self._png_files(image_id)[1], self.num_classes)
        from pycocotools import mask as mask_utils

        split, row = self._locate(image_id)
        s = self._stores[split]
        h, w = s["sizes"][row]
        label = np.zeros((h, w), np.uint8)
        lo, hi = int(s["inst_start"][row]), int(s["inst_start"][row + 1])
        if hi > lo:
            rles = [
                {"size": [h, w], "counts": bytes(s["rle_bytes"][s["rle_start"][k] : s["rle_start"][k + 1]])}
                for k in range(lo, hi)
            ]
            masks = mask_utils.decode(rles)
            for k in range(hi - lo):  # paint order: later instances on top
                label[masks[:, :, k] > 0] = s["inst_value"][lo + k]
        return label

    def _png_files(self, image_id: str) -> tuple[Path, Path]:
        if image_id not in self._png_paths:
            for split in ("train", "val"):
                self.split_entries(split)
            if image_id not in self._png_paths:
                raise DataError(f"no COCO image {image_id!r} in the train or val lists")
        return self._png_paths[image_id]

    def fingerprint(self, split: str) -> str:
        self._check_split(split)
        if self.labels == "json" and not self.lists[split]:
            return self._store_fingerprint(split)  # cheap: a restart need not open the store
        entries = self.split_entries(split)
        pairs = entries.classes or {}
        seed = "\n".join(f"{i}:{sorted(pairs.get(i, ()))}" for i in entries.ids).encode()
        if self.labels == "json":
            return hashlib.sha1(seed + self._store_fingerprint(split).encode()).hexdigest()
        return files_fingerprint(seed, [self._png_files(i)[1] for i in entries.ids])
