"""The list files the reference code bases ship, read without conversion scripts.

Accepted (one file, or a folder of them whose entries are merged in name order):
- image ids, one per line (VOC `ImageSets/Segmentation/*.txt`);
- PFENet / ASGNet / BAM `lists/`: "image_path label_path" per line, relative to the data root;
- HSNet `data/splits/pascal/{trn,val}/fold*.txt`: "IMAGEID__CLS" per line (CLS: 1-based class id);
  a folder such as `splits/pascal/trn` merges the four folds;
- BAM `sub_class_file_list_*.txt`: a Python dict literal {class: [[image, label], ...]}, parsed
  with ast.literal_eval (never eval);
- HSNet `data/splits/coco/{trn,val}/fold*.pkl`: a pickled dict {0-based class: [image paths]},
  read by an unpickler that accepts only builtin containers and strings (never arbitrary objects).

Files that name (image, class) pairs restrict which classes an image may be used for; the others
allow every class present in the image.
"""

from __future__ import annotations

import ast
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from fewshotseg.errors import DataError

LIST_FORMATS_HELP = (
    "expected one image id per line, PFENet 'image_path label_path' lines, HSNet 'IMAGEID__CLS' lines, "
    "a BAM sub_class_file_list dict literal, an HSNet COCO fold*.pkl, or a folder of such files"
)


@dataclass
class ListEntries:
    ids: list[str] = field(default_factory=list)  # image ids (file stems), list order, no repeats
    paths: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # id -> (image, label) as listed
    classes: dict[str, set[int]] | None = None  # id -> classes the list pairs it with (None: any)
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(
        self, image_id: str, paths: tuple[str, str | None] | None = None, class_id: int | None = None
    ) -> None:
        if image_id not in self.paths and paths is not None:
            self.paths[image_id] = paths
        if class_id is not None:
            if self.classes is None:
                self.classes = {}
            self.classes.setdefault(image_id, set()).add(class_id)
        if image_id not in self._seen:
            self._seen.add(image_id)
            self.ids.append(image_id)


class _BuiltinsOnly(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings and numbers; refuses every class or function."""

    def find_class(self, module: str, name: str):
        raise DataError(f"refusing to unpickle {module}.{name}: list files may hold only builtin containers")


def _stem(path: str) -> str:
    return Path(path).stem


def _read_pickle(path: Path, out: ListEntries) -> None:
    try:
        data = _BuiltinsOnly(io.BytesIO(path.read_bytes())).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise DataError(f"cannot read list file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(
            f"list file {path} holds a {type(data).__name__}: expected a dict {{class: [images]}}"
        )
    for cls in sorted(data):  # HSNet: 0-based class index -> image paths
        for image in data[cls]:
            out.add(_stem(image), (str(image), None), int(cls) + 1)


def _read_dict_literal(path: Path, text: str, out: ListEntries) -> None:
    try:
        data = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(f"list file {path} starts with '{{' but is not a dict literal: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"list file {path}: expected a dict {{class: [(image, label), ...]}}")
    for cls in sorted(data):  # BAM: 1-based class -> [(image, label)]
        for item in data[cls]:
            image, label = (item[0], item[1]) if isinstance(item, (list, tuple)) else (item, None)
            out.add(_stem(image), (str(image), label), int(cls))


def _read_lines(path: Path, text: str, out: ListEntries) -> None:
    for n, raw in enumerate(text.splitlines(), 1):
        tokens = raw.split()
        if not tokens:
            continue
        if len(tokens) == 2:  # PFENet: image label
            out.add(_stem(tokens[0]), (tokens[0], tokens[1]))
        elif len(tokens) == 1 and "__" in tokens[0]:  # HSNet: IMAGEID__CLS
            image_id, _, cls = tokens[0].rpartition("__")
            if not cls.isdigit():
                raise DataError(
                    f"{path} line {n}: {raw.strip()!r} looks like HSNet 'IMAGEID__CLS' but CLS is not a number"
                )
            out.add(image_id, None, int(cls))
        elif len(tokens) == 1:
            out.add(_stem(tokens[0]), (tokens[0], None) if "/" in tokens[0] else None)
        else:
            raise DataError(f"{path} line {n}: {raw.strip()!r}: {LIST_FORMATS_HELP}")


def read_list(path: Path) -> ListEntries:
    """Read a list file or a folder of list files (see the module docstring for the formats)."""
    path = Path(path)
    out = ListEntries()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".pkl") and p.is_file())
        if not files:
            raise DataError(f"list folder {path} holds no .txt or .pkl files: {LIST_FORMATS_HELP}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"missing list file {path}: {LIST_FORMATS_HELP}")
    for f in files:
        if f.suffix == ".pkl":
            _read_pickle(f, out)
            continue
        text = f.read_text()
        if text.lstrip().startswith("{"):
            _read_dict_literal(f, text, out)
        else:
            _read_lines(f, text, out)
    if not out.ids:
        raise DataError(f"list {path} names no images: {LIST_FORMATS_HELP}")
    return out
