"""Your own data (data=folder): a folder of images with masks and a class list.

    <root>/images/<id>.jpg|.jpeg|.png|.bmp|.tif   the images
    <root>/masks/<id>.png                         mask_format=indexed: one label PNG per image,
                                                  0 background, i = the i-th class, 255 ignore
    <root>/masks/<class name>/<id>.png            mask_format=per_class: a black/white mask per class
                                                  present in the image (grey >= 128 = the object)
    <root>/classes.txt                            class names, one per line: line i is class id i
                                                  (a first line "background"/"_background_" is id 0
                                                  and skipped); for per_class it defaults to the sorted
                                                  mask folder names
    <root>/splits/train.txt, <root>/splits/val.txt  optional image-id lists (any format lists.py reads);
                                                  without them both splits hold every image, and the
                                                  folds alone keep test classes out of training

Folds: `folds` lists the novel classes of each fold (names or ids), e.g. [[cat, dog], [car, bus]];
without it the arithmetic folds of data.num_folds / data.fold_split apply.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from fewshotseg.data.lists import ListEntries, read_list
from fewshotseg.data.sources.base import (
    ClassSplit,
    SegmentationSource,
    check_choice,
    check_root,
    files_fingerprint,
    read_binary_mask,
    read_image,
    read_label,
    require_dir,
    resolve_path,
)
from fewshotseg.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BACKGROUND_NAMES = ("background", "_background_", "__background__")
FOLDER_LAYOUT_HELP = (
    "expected <root>/images/<id>.jpg, masks as <root>/masks/<id>.png (indexed class ids, 255 = ignore) "
    "or <root>/masks/<class>/<id>.png (one black/white mask per class), and <root>/classes.txt "
    "(one class name per line)"
)


class FolderSource(SegmentationSource):
    def __init__(
        self,
        root: str | Path,
        image_dir: str = "images",
        mask_dir: str = "masks",
        classes: str = "classes.txt",
        mask_format: str = "auto",
        train_list: str | None = None,
        val_list: str | None = None,
        folds: list[list[str | int]] | None = None,
        name: str = "folder",
    ):
        self.root = Path(root).expanduser()
        self.name = name
        self.image_dir, self.mask_dir = resolve_path(self.root, image_dir), resolve_path(self.root, mask_dir)
        self.classes_file = resolve_path(self.root, classes)
        self.mask_format_setting = check_choice(
            "data.source.mask_format", mask_format, ("auto", "indexed", "per_class")
        )
        self.lists = {"train": train_list or "splits/train.txt", "val": val_list or "splits/val.txt"}
        self.explicit_lists = {"train": train_list is not None, "val": val_list is not None}
        self.folds = [list(f) for f in folds] if folds is not None else None
        self._entries: dict[str, ListEntries] = {}

    def prepare(self) -> None:
        check_root(self.root, self.name, FOLDER_LAYOUT_HELP)
        require_dir(self.image_dir, "images", FOLDER_LAYOUT_HELP)
        require_dir(self.mask_dir, "masks", FOLDER_LAYOUT_HELP)
        stray = sorted(set(self._mask_ids) - set(self._images))
        if stray:
            raise DataError(
                f"{len(stray)} masks have no image in {self.image_dir}, e.g. {stray[:3]}: {FOLDER_LAYOUT_HELP}"
            )

    # --- layout ----------------------------------------------------------------------------------
    @cached_property
    def mask_format(self) -> str:
        if self.mask_format_setting != "auto":
            return self.mask_format_setting
        require_dir(self.mask_dir, "masks", FOLDER_LAYOUT_HELP)
        return "per_class" if any(p.is_dir() for p in self.mask_dir.iterdir()) else "indexed"

    @cached_property
    def class_names(self) -> list[str]:  # type: ignore[override]
        check_root(self.root, self.name, FOLDER_LAYOUT_HELP)
        if self.classes_file.is_file():
            names = [line.strip() for line in self.classes_file.read_text().splitlines() if line.strip()]
            if names and names[0].lower() in BACKGROUND_NAMES:
                names = names[1:]
            if not names:
                raise DataError(f"class list {self.classes_file} names no classes: {FOLDER_LAYOUT_HELP}")
            if len(set(names)) != len(names):
                raise DataError(f"class list {self.classes_file} names a class twice")
            if self.mask_format == "indexed" and len(names) > 254:
                raise DataError(
                    f"class list {self.classes_file} has {len(names)} classes: indexed PNG masks hold at most 254 (255 = ignore); use per-class mask folders"
                )
            return names
        if self.mask_format == "per_class":
            return sorted(p.name for p in self.mask_dir.iterdir() if p.is_dir())
        raise DataError(
            f"missing file {self.classes_file} (the class list, one name per line): {FOLDER_LAYOUT_HELP}"
        )

    @cached_property
    def _images(self) -> dict[str, Path]:
        require_dir(self.image_dir, "images", FOLDER_LAYOUT_HELP)
        images: dict[str, Path] = {}
        for p in sorted(self.image_dir.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                if p.stem in images:
                    raise DataError(
                        f"two images share the id {p.stem!r}: {images[p.stem].name} and {p.name} in {self.image_dir}"
                    )
                images[p.stem] = p
        if not images:
            raise DataError(f"no images in {self.image_dir}: {FOLDER_LAYOUT_HELP}")
        return images

    @cached_property
    def _class_masks(self) -> dict[str, dict[int, Path]]:
        """per_class layout: image id -> {class id: mask file}."""
        ids = {n: i + 1 for i, n in enumerate(self.class_names)}
        out: dict[str, dict[int, Path]] = {}
        for folder in sorted(p for p in self.mask_dir.iterdir() if p.is_dir()):
            if folder.name not in ids:
                raise DataError(
                    f"mask folder {folder} is not a class of {self.classes_file}: expected one of {self.class_names[:10]}..."
                )
            for m in folder.glob("*.png"):
                out.setdefault(m.stem, {})[ids[folder.name]] = m
        return out

    @cached_property
    def _mask_ids(self) -> list[str]:
        if self.mask_format == "per_class":
            return list(self._class_masks)
        return [p.stem for p in self.mask_dir.glob("*.png")]

    # --- splits ----------------------------------------------------------------------------------
    def split_entries(self, split: str) -> ListEntries:
        if split not in self.lists:
            raise DataError(f"unknown split {split!r} for {self.name}: expected 'train' or 'val'")
        if split not in self._entries:
            path = resolve_path(self.root, self.lists[split])
            if path.exists() or self.explicit_lists[split]:
                entries = read_list(path)
                unknown = [i for i in entries.ids if i not in self._images]
                if unknown:
                    raise DataError(
                        f"list {path} names {len(unknown)} images not in {self.image_dir}, e.g. {unknown[:3]}"
                    )
            else:
                entries = ListEntries()
                for image_id in self._images:
                    entries.add(image_id)
            self._entries[split] = entries
        return self._entries[split]

    def class_split(self, fold: int, num_folds: int, fold_split: str) -> ClassSplit:
        if self.folds is None:
            return super().class_split(fold, num_folds, fold_split)
        if not 0 <= fold < len(self.folds):
            raise ConfigError(
                f"fold={fold} is out of range: data.source.folds defines {len(self.folds)} folds (0..{len(self.folds) - 1})"
            )
        ids = {n: i + 1 for i, n in enumerate(self.class_names)}
        novel = []
        for c in self.folds[fold]:
            if isinstance(c, int) and 1 <= c <= self.num_classes:
                novel.append(c)
            elif str(c) in ids:
                novel.append(ids[str(c)])
            else:
                raise ConfigError(
                    f"data.source.folds[{fold}] names {c!r}: not a class of {self.classes_file} (names or ids 1..{self.num_classes})"
                )
        base = [c for c in range(1, self.num_classes + 1) if c not in novel]
        return ClassSplit(base, sorted(novel), sorted(novel))

    # --- files -----------------------------------------------------------------------------------
    def _image_path(self, image_id: str) -> Path:
        if image_id not in self._images:
            raise DataError(f"no image {image_id!r} in {self.image_dir}")
        return self._images[image_id]

    def load_image(self, image_id: str) -> np.ndarray:
        return read_image(self._image_path(image_id))

    def load_label(self, image_id: str) -> np.ndarray:
        if self.mask_format == "per_class":
            return super().load_label(image_id)
        return read_label(self.mask_dir / f"{image_id}.png", self.num_classes)

    def _per_class_masks(self, image_id: str) -> dict[int, Path]:
        masks = self._class_masks.get(image_id)
        if not masks:
            raise DataError(f"image {self._image_path(image_id)} has no mask in any class folder "
                            f"{self.mask_dir}/<class>/{image_id}.png: every image needs a label")  # fmt: skip
        return masks

    def load_mask(self, image_id: str, class_id: int) -> np.ndarray:
        if self.mask_format == "indexed":
            return super().load_mask(image_id, class_id)
        path = self._per_class_masks(image_id).get(class_id)
        if path is None:
            with Image.open(self._image_path(image_id)) as im:
                return np.zeros(im.size[::-1], np.uint8)
        return read_binary_mask(path)

    def class_areas(self, image_id: str) -> dict[int, int]:
        if self.mask_format == "indexed":
            return super().class_areas(image_id)
        areas = {
            c: int(read_binary_mask(p).sum()) for c, p in sorted(self._per_class_masks(image_id).items())
        }
        return {c: a for c, a in areas.items() if a}

    def fingerprint(self, split: str) -> str:
        ids = self.image_ids(split)
        pairs = self.split_pairs(split) or {}
        seed = ("\n".join(f"{i}:{sorted(pairs.get(i, ()))}" for i in ids) + f"|{self.class_names}").encode()
        if self.mask_format == "indexed":
            files = [self.mask_dir / f"{i}.png" for i in ids]
        else:
            files = [p for i in ids for _, p in sorted(self._class_masks.get(i, {}).items())]
        return files_fingerprint(seed, files)
