"""Converting a COCO instances JSON into per-image painted-label data, fast and exactly.

Two passes, both spread over worker processes (forked, so the decoded file is shared, not copied):
1. parse the annotations and rasterise each one to a compressed RLE (pycocotools) -- the
   `annotations` array is cut at object boundaries and every worker parses its own part, which
   matters because Python's JSON parser is the slowest step for a 330 MB file;
2. per image: the paint order and each class's visible pixel count, with RLE arithmetic only.

The cut is checked: every part must end exactly where the next begins and the last at the array's
closing bracket; otherwise (an unusual file layout) the whole file is parsed at once instead.
Polygons with fewer than 3 points cover nothing and are dropped (pycocotools would read a 4-number
polygon as a box).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fewshotseg.data.episode import IGNORE_INDEX
from fewshotseg.errors import DataError

# (image id, annotation id, `area` field, category id, iscrowd, compressed RLE counts or None)
Record = tuple[int, int, float, int, int, bytes | None]

_AREA_CHUNK = 255  # pycocotools' area() overflows on lists longer than this
_ANNOTATIONS = re.compile(r'"annotations"\s*:\s*\[')
_NEXT_OBJECT = re.compile(r"\}\s*,\s*\{")
_COMMA = re.compile(r"\s*,\s*")
_CLOSE = re.compile(r"\s*\]")

# Shared with forked workers (copy-on-write).
_WORK: dict = {}


class _Misaligned(Exception):
    """A part of the annotations array did not tile with its neighbours."""


def _areas(rles: list[dict]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return np.concatenate(
        [mask_utils.area(rles[i : i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK)]
    ).astype(np.int64)


def to_rle(segmentation, h: int, w: int, where: str) -> bytes | None:
    """The compressed RLE counts of an annotation's polygons or RLE; None if it covers nothing."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        rles = mask_utils.frPyObjects(polygons, h, w)
        return (rles[0] if len(rles) == 1 else mask_utils.merge(rles))["counts"]
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise DataError(f"{where}: segmentation is neither polygons nor RLE")
    if list(segmentation.get("size", [])) != [h, w]:
        raise DataError(f"{where}: RLE size {segmentation.get('size')} differs from the image size {[h, w]}")
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd regions)
        return mask_utils.frPyObjects(segmentation, h, w)["counts"]
    counts = segmentation["counts"]
    return counts.encode() if isinstance(counts, str) else counts


def _record(ann: dict, sizes: dict[int, tuple[int, int]], where: str) -> Record:
    try:
        image_id = ann["image_id"]
        h, w = sizes[image_id]
        return (image_id, int(ann.get("id", 0)), float(ann.get("area", 0.0)), ann["category_id"], int(bool(ann.get("iscrowd", 0))),
                to_rle(ann["segmentation"], h, w, f"{where} annotation {ann.get('id')}"))  # fmt: skip
    except KeyError as e:
        raise DataError(
            f"{where}: annotation {ann.get('id')} has no {e} (or names an image that is not in 'images')"
        ) from None


def _parse_part(k: int) -> tuple[list[Record], int]:
    """Parse the k-th part of the annotations array; returns its records and where it stopped."""
    text, bounds, sizes, where = _WORK["text"], _WORK["bounds"], _WORK["sizes"], _WORK["where"]
    decoder = json.JSONDecoder()
    pos, stop = bounds[k], bounds[k + 1] if k + 1 < len(bounds) else None
    out: list[Record] = []
    while True:
        try:
            ann, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _Misaligned(str(e)) from None
        if not isinstance(ann, dict):
            raise _Misaligned("not an object")
        try:
            out.append(_record(ann, sizes, where))
        except DataError as e:  # maybe an object nested in an annotation: the serial parse decides
            raise _Misaligned(str(e)) from None
        comma = _COMMA.match(text, pos)
        if comma:
            pos = comma.end()
            if stop is not None and pos >= stop:
                if pos != stop:
                    raise _Misaligned(f"part {k} ran past its end")
                return out, pos
            continue
        close = _CLOSE.match(text, pos)
        if close is None or stop is not None:
            raise _Misaligned(f"part {k} ended early")
        return out, close.end()


def _records_of_list(bounds: tuple[int, int]) -> list[Record]:
    anns, sizes, where = _WORK["anns"], _WORK["sizes"], _WORK["where"]
    return [_record(a, sizes, where) for a in anns[bounds[0] : bounds[1]]]


def _map(fn, tasks: list, workers: int, desc: str, total: int, weight=len) -> list:
    """fn over tasks, in order, in forked workers when there are several (else in-process)."""
    results = []
    with tqdm(total=total, desc=desc, leave=False, unit="img") as bar:
        if (
            workers > 1
            and len(tasks) > 1
            and sys.platform.startswith("linux")
            and not mp.current_process().daemon
        ):
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                for t, r in zip(tasks, pool.map(fn, tasks)):
                    results.append(r)
                    bar.update(weight(t))
        else:
            for t in tasks:
                results.append(fn(t))
                bar.update(weight(t))
    return results


def _top_level_array(text: str, key: str, start: int = 0):
    m = re.compile(rf'"{key}"\s*:\s*\[').search(text, start)
    if m is None:
        return None
    return json.JSONDecoder().raw_decode(text, m.end() - 1)[0]


def _parallel_parse(text: str, workers: int, where: str) -> tuple[list, list, list[Record]] | None:
    """images, categories and records by parsing the annotations array in parts; None if the file's
    layout does not allow it."""
    m = _ANNOTATIONS.search(text)
    images = _top_level_array(text, "images")
    categories = _top_level_array(text, "categories")
    if m is None or not isinstance(images, list) or not isinstance(categories, list):
        return None
    first = re.compile(r"\s*").match(text, m.end()).end()
    if text.startswith("]", first):
        return images, categories, []
    # the array ends before the next top-level key that follows it (COCO writes "categories" last)
    following = [
        k.start()
        for k in re.finditer(r'"(?:images|categories|licenses|info)"\s*:', text)
        if k.start() > first
    ]
    parts = max(1, workers * 4)
    span = (min(following) if following else len(text)) - first
    bounds = [first]
    for k in range(1, parts):
        nxt = _NEXT_OBJECT.search(text, first + k * span * 99 // (100 * parts))
        if nxt is None:
            break
        if nxt.end() - 1 > bounds[-1]:
            bounds.append(nxt.end() - 1)
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    _WORK.update(text=text, bounds=bounds, sizes=sizes, where=where)
    try:
        parsed = _map(
            _parse_part,
            list(range(len(bounds))),
            workers,
            "parsing annotations",
            len(bounds),
            weight=lambda t: 1,
        )
    except _Misaligned:
        return None
    finally:
        _WORK.clear()
    ends = [end for _, end in parsed]
    if ends[:-1] != bounds[1:]:
        return None
    return images, categories, [r for part, _ in parsed for r in part]


def read_annotations(path: Path, workers: int) -> tuple[list, list, list[Record]]:
    """(images, categories, one record per annotation) of a COCO instances file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read COCO annotations {path}: {e}") from e
    try:
        fast = _parallel_parse(text, workers, path.name)
    except json.JSONDecodeError:
        fast = None
    if fast is not None:
        return fast
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(f"cannot read COCO annotations {path}: {e}") from e
    del text
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"{path} is not a COCO instances file: expected lists 'images', 'annotations' and 'categories'"
        )
    anns = data["annotations"]
    _WORK.update(
        anns=anns, sizes={im["id"]: (im["height"], im["width"]) for im in data["images"]}, where=path.name
    )
    try:
        chunks = [(i, min(i + 4096, len(anns))) for i in range(0, len(anns), 4096)]
        parts = _map(
            _records_of_list, chunks, workers, "rasterising annotations", len(chunks), weight=lambda t: 1
        )
    finally:
        _WORK.clear()
    return data["images"], data["categories"], [r for p in parts for r in p]


def paint_order(records: list[Record], h: int, w: int, cat_to_class: dict[int, int], crowd: str):
    """For one image's records: the paint order (indices: larger `area` first, smaller on top, ties
    by annotation id; empty masks dropped), the label value of each painted instance, and each
    class's visible pixel count in the painted label, computed exactly on RLEs: an instance keeps
    its pixels minus those of the instances painted after it that overlap it."""
    from pycocotools import mask as mask_utils

    order = [
        i
        for i in sorted(range(len(records)), key=lambda i: (-records[i][2], records[i][1]))
        if records[i][5] is not None
    ]
    values = [
        IGNORE_INDEX if records[i][4] and crowd == "ignore" else cat_to_class[records[i][3]] for i in order
    ]
    areas: dict[int, int] = {}
    if not order:
        return order, values, areas
    rles = [{"size": [h, w], "counts": records[i][5]} for i in order]
    visible = _areas(rles)
    box = mask_utils.toBbox(rles)
    x0, y0, x1, y1 = box[:, 0], box[:, 1], box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]
    for i in range(len(rles) - 1):
        later = np.arange(i + 1, len(rles))
        later = later[(x0[later] < x1[i]) & (x0[i] < x1[later]) & (y0[later] < y1[i]) & (y0[i] < y1[later])]
        if visible[i] and later.size:
            cover = rles[later[0]] if later.size == 1 else mask_utils.merge([rles[j] for j in later])
            visible[i] -= int(mask_utils.area(mask_utils.merge([rles[i], cover], intersect=True)))
    for v, n in zip(values, visible.tolist()):
        if v != IGNORE_INDEX and n > 0:
            areas[v] = areas.get(v, 0) + n
    return order, values, areas


def _paint_images(bounds: tuple[int, int]) -> list:
    images, groups, cat_to_class, crowd = (
        _WORK["images"],
        _WORK["groups"],
        _WORK["cat_to_class"],
        _WORK["crowd"],
    )
    return [
        paint_order(groups[k], images[k]["height"], images[k]["width"], cat_to_class, crowd)
        for k in range(*bounds)
    ]


def convert(path: Path, workers: int | None, crowd: str, class_names: list[str]):
    """The images with annotations (sorted by file name) and, per image, (RLE counts in paint order,
    label values, visible pixels per class)."""
    workers = max(1, workers if workers is not None else os.cpu_count() or 1)
    images, categories, records = read_annotations(path, workers)
    cats = sorted(categories, key=lambda c: c["id"])
    names = [c.get("name") for c in cats]
    if names != class_names:
        raise DataError(f"{path} has {len(names)} categories {names[:5]}...: expected the 80 COCO categories")
    cat_to_class = {c["id"]: i + 1 for i, c in enumerate(cats)}
    unknown = {r[3] for r in records} - set(cat_to_class)
    if unknown:
        raise DataError(
            f"{path}: annotations use category ids {sorted(unknown)[:5]} that are not in 'categories'"
        )
    by_image: dict[int, list[Record]] = {}
    for r in records:
        by_image.setdefault(r[0], []).append(r)
    del records
    images = sorted((im for im in images if im["id"] in by_image), key=lambda im: im["file_name"])
    groups = [by_image[im["id"]] for im in images]
    del by_image
    _WORK.update(images=images, groups=groups, cat_to_class=cat_to_class, crowd=crowd)
    try:
        chunks = [(i, min(i + 1024, len(images))) for i in range(0, len(images), 1024)]
        painted = [
            p
            for part in _map(
                _paint_images,
                chunks,
                workers,
                f"indexing {path.name}",
                len(images),
                weight=lambda t: t[1] - t[0],
            )
            for p in part
        ]
    finally:
        _WORK.clear()
    per_image = [
        ([g[i][5] for i in order], values, areas) for g, (order, values, areas) in zip(groups, painted)
    ]
    return images, per_image
