"""Class index: for every image of a split, which classes it contains and with how many pixels.

Built once in parallel (reading every label is the slow part of FSS data loading; COCO computes it
from its annotation file instead, see sources/coco.py), saved as JSON in the source's cache folder
and reused until the source's fingerprint changes.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from fewshotseg.data.sources.base import SegmentationSource

# image id -> {class id: foreground pixel count at original resolution}
ClassIndex = dict[str, dict[int, int]]

_INDEX_VERSION = 2


def _chunk_areas(args: tuple[SegmentationSource, list[str]]) -> list[tuple[str, dict[int, int]]]:
    source, ids = args
    return [(i, source.class_areas(i)) for i in ids]


def build_class_index(source: SegmentationSource, split: str, num_workers: int | None = None) -> ClassIndex:
    bulk = source.build_index(split, num_workers)
    if bulk is not None:
        return bulk
    ids = source.image_ids(split)
    workers = min(num_workers if num_workers is not None else os.cpu_count() or 1, max(1, len(ids) // 64))
    desc = f"indexing {source.name}/{split}"
    if workers <= 1:
        return {i: source.class_areas(i) for i in tqdm(ids, desc=desc, leave=False)}
    chunks = [ids[i : i + 256] for i in range(0, len(ids), 256)]
    index: ClassIndex = {}
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(ids), desc=desc, leave=False) as bar:
        for part in pool.map(_chunk_areas, [(source, c) for c in chunks]):
            index.update(part)
            bar.update(len(part))
    return {i: index[i] for i in ids}  # keep list order


def load_class_index(source: SegmentationSource, split: str, num_workers: int | None = None) -> ClassIndex:
    """The cached index if it matches the source's current fingerprint, else a fresh build."""
    path = Path(source.cache_dir()) / f"index_{split}.json"
    fingerprint = f"v{_INDEX_VERSION}:{source.fingerprint(split)}"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fingerprint:
                return {k: {int(c): a for c, a in v.items()} for k, v in cached["images"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass  # a damaged cache is rebuilt
    index = build_class_index(source, split, num_workers)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "images": index}))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return index
