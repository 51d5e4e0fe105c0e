"""FSS-1000: 1000 class folders of image/mask pairs, `<root>/<class>/<n>.jpg` + `<root>/<class>/<n>.png`.

No folds: the classes are split once into 520 training, 240 validation and 240 test classes by
three class-list files in HSNet's `data/splits/fss/{trn,val,test}.txt` format (one class name per
line). Class ids follow HSNet: the sorted training classes are 1..520, then the sorted validation
classes, then the sorted test classes (HSNet's 0-based class index + 1). The splits `train`, `val`
and `test` hold the images of those classes; every image shows one object of its folder's class.
Masks are black/white: grey value >= 128 is the object (as HSNet reads them).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from fewshotseg.data.sources.base import (
    ClassSplit,
    SegmentationSource,
    check_root,
    files_fingerprint,
    read_binary_mask,
    read_image,
    require_file,
    resolve_path,
)
from fewshotseg.errors import ConfigError, DataError

FSS_LAYOUT_HELP = (
    "expected FSS-1000 as <root>/<class>/<n>.jpg with the mask <root>/<class>/<n>.png, and the class "
    "lists trn.txt, val.txt, test.txt (one class per line, HSNet's data/splits/fss) in data.source.split_dir"
)
SPLIT_FILES = {"train": "trn.txt", "val": "val.txt", "test": "test.txt"}


class FSS1000(SegmentationSource):
    def __init__(self, root: str | Path, split_dir: str = "splits"):
        self.root = Path(root).expanduser()
        self.name = "fss1000"
        self.split_dir = resolve_path(self.root, split_dir)
        self._classes: dict[str, list[str]] | None = None
        self._images: dict[str, list[str]] = {}

    def _split_classes(self) -> dict[str, list[str]]:
        if self._classes is None:
            check_root(self.root, self.name, FSS_LAYOUT_HELP)
            classes = {}
            for split, fname in SPLIT_FILES.items():
                path = self.split_dir / fname
                require_file(path, f"the FSS-1000 {split} class list", FSS_LAYOUT_HELP)
                names = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
                if not names:
                    raise DataError(f"class list {path} is empty: {FSS_LAYOUT_HELP}")
                classes[split] = names
            seen: dict[str, str] = {}
            for split, names in classes.items():
                for n in names:
                    if n in seen:
                        raise DataError(
                            f"class {n!r} is in both the {seen[n]} and the {split} class list ({self.split_dir})"
                        )
                    seen[n] = split
            self._classes = classes
        return self._classes

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        c = self._split_classes()
        return c["train"] + c["val"] + c["test"]

    def _ids_of(self, split: str) -> list[int]:
        sizes = [len(v) for v in self._split_classes().values()]
        start = {"train": 1, "val": 1 + sizes[0], "test": 1 + sizes[0] + sizes[1]}[split]
        return list(range(start, start + len(self._split_classes()[split])))

    def prepare(self) -> None:
        check_root(self.root, self.name, FSS_LAYOUT_HELP)
        missing = [n for n in self.class_names if not (self.root / n).is_dir()]
        if missing:
            raise DataError(f"{len(missing)} class folders of the class lists are missing under {self.root}, e.g. "
                            f"{missing[:3]}: {FSS_LAYOUT_HELP}")  # fmt: skip

    def class_split(self, fold: int, num_folds: int, fold_split: str) -> ClassSplit:
        if fold != 0:
            raise ConfigError(
                f"fold={fold}: FSS-1000 has one fixed class split (trn/val/test class lists), so fold must be 0"
            )
        return ClassSplit(self._ids_of("train"), self._ids_of("val"), self._ids_of("test"))

    def image_ids(self, split: str) -> list[str]:
        if split not in SPLIT_FILES:
            raise DataError(f"unknown split {split!r} for FSS-1000: expected one of {sorted(SPLIT_FILES)}")
        if split not in self._images:
            ids = []
            for name in self._split_classes()[split]:
                folder = self.root / name
                if not folder.is_dir():
                    raise DataError(f"missing class folder {folder}: {FSS_LAYOUT_HELP}")
                jpgs = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))  # 1, 2, ..., 10
                if not jpgs:
                    raise DataError(f"class folder {folder} holds no .jpg images: {FSS_LAYOUT_HELP}")
                ids += [f"{name}/{p.stem}" for p in jpgs]
            self._images[split] = ids
        return self._images[split]

    @cached_property
    def _class_index(self) -> dict[str, int]:
        return {n: i + 1 for i, n in enumerate(self.class_names)}

    def _class_of(self, image_id: str) -> int:
        name = image_id.rsplit("/", 1)[0]
        if name not in self._class_index:
            raise DataError(
                f"image {image_id!r}: class {name!r} is in none of the class lists in {self.split_dir}"
            )
        return self._class_index[name]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self.root / f"{image_id}.jpg")

    def load_mask(self, image_id: str, class_id: int) -> np.ndarray:
        mask = read_binary_mask(self.root / f"{image_id}.png")
        return mask if class_id == self._class_of(image_id) else np.zeros_like(mask)

    def class_areas(self, image_id: str) -> dict[int, int]:
        area = int(read_binary_mask(self.root / f"{image_id}.png").sum())
        return {self._class_of(image_id): area} if area else {}

    def fingerprint(self, split: str) -> str:
        ids = self.image_ids(split)
        return files_fingerprint("\n".join(ids).encode(), [self.root / f"{i}.png" for i in ids])
