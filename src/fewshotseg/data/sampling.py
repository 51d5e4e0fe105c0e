"""Episode sampling.

Training episodes are drawn at random: image-first (PFENet family: walk the query images, pick one
of the base classes present, draw K supports of that class other than the query) or class-first
(PANet: a class uniformly, then K + 1 distinct images of it, the last one the query). Test episodes are drawn once
from a seed and saved to a file, so every method, worker count, batch size and device count is
evaluated on the same episodes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fewshotseg.data.index import ClassIndex


@dataclass(frozen=True)
class EpisodeSpec:
    query: str
    class_id: int
    supports: tuple[str, ...]


def images_per_class(index: ClassIndex, classes: list[int], min_area: int = 0) -> dict[int, list[str]]:
    """Images in which each class covers at least `min_area` pixels (the support pools), list order."""
    pools: dict[int, list[str]] = {c: [] for c in classes}
    for image_id, areas in index.items():
        for c, area in areas.items():
            if c in pools and area >= max(min_area, 1):
                pools[c].append(image_id)
    return pools


def query_images(index: ClassIndex, classes: list[int], min_area: int = 0) -> list[str]:
    """Images with at least one of `classes` above `min_area` pixels (the PFENet image list rule)."""
    wanted = set(classes)
    return [
        i
        for i, areas in index.items()
        if any(c in wanted and a >= max(min_area, 1) for c, a in areas.items())
    ]


def draw_supports(rng: np.random.Generator, pool: list[str], query: str, shot: int) -> tuple[str, ...]:
    """K supports of the pool, never the query; distinct unless the pool is smaller than K."""
    candidates = [i for i in pool if i != query]
    if not candidates:
        raise ValueError(f"no support image other than the query {query!r} in this class's pool")
    replace = len(candidates) < shot
    picks = rng.choice(len(candidates), size=shot, replace=replace)
    return tuple(candidates[int(p)] for p in picks)


def pick_class(
    rng: np.random.Generator, areas: dict[int, int], pools: dict[int, list[str]], query: str
) -> int | None:
    """A class of `pools` present in the query that has at least one other image to support it."""
    present = sorted(c for c in areas if c in pools and any(i != query for i in pools[c][:2]))
    return int(rng.choice(present)) if present else None


TRAIN_ORDERS = ("image", "class")


def draw_train_episode(rng: np.random.Generator, order: str, query: str | None, index: ClassIndex,
                       pools: dict[int, list[str]], shot: int) -> EpisodeSpec:  # fmt: skip
    """One training episode. order="image": `query` and a class present in it that another image
    can support (PFENet); a frequent class comes up as often as it is shown. order="class": a class
    uniformly among those with two images or more, then shot + 1 distinct images of it (fewer:
    repeats), the first `shot` the supports, the last the query (PANet's `PairedDataset`); `query`
    is not used."""
    if order == "image":
        c = pick_class(rng, index[query], pools, query)
        return EpisodeSpec(query, c, draw_supports(rng, pools[c], query, shot))
    if order == "class":
        usable = [c for c in sorted(pools) if len(pools[c]) >= 2]
        c = usable[int(rng.integers(len(usable)))]
        pool = pools[c]
        picks = rng.choice(len(pool), size=shot + 1, replace=len(pool) < shot + 1)
        return EpisodeSpec(pool[int(picks[-1])], c, tuple(pool[int(p)] for p in picks[:-1]))
    raise ValueError(f"unknown training episode order {order!r}: expected one of {list(TRAIN_ORDERS)}")


def sample_test_episodes(
    index: ClassIndex,
    classes: list[int],
    shot: int,
    num_episodes: int,
    seed: int,
    min_area: int = 0,
    order: str = "image",
) -> list[EpisodeSpec]:
    """The fixed test episodes of a fold.

    order="image": query images in list order, cycling; the class is drawn among the fold's classes
    present in the query, with no size filter (PFENet/ASGNet). order="pair": the (image, class)
    pairs of the list in order, cycling (HSNet on PASCAL; on FSS-1000 one pass = every test image
    once). order="class": a class uniformly, then a query image of that class (HSNet on COCO).
    Supports: K images of the class's pool (images where the class covers >= min_area pixels),
    never the query.
    """
    rng = np.random.default_rng(seed)
    pools = images_per_class(index, classes, min_area)
    if order in ("image", "pair"):
        if order == "image":
            items = [(q, None) for q in query_images(index, classes, min_area)]
        else:
            members = {c: set(pool) for c, pool in pools.items()}
            items = [(q, c) for q in index for c in sorted(index[q]) if q in members.get(c, ())]
        episodes: list[EpisodeSpec] = []
        n = 0
        while len(episodes) < num_episodes and items:
            query, c = items[n % len(items)]
            c = pick_class(rng, index[query], pools, query) if c is None else c
            if c is not None and any(i != query for i in pools[c][:2]):
                episodes.append(EpisodeSpec(query, c, draw_supports(rng, pools[c], query, shot)))
            n += 1
            if n >= len(items) and not episodes:
                break  # a whole pass without a usable item
        if not episodes:
            raise ValueError(
                f"no image of classes {classes} has another image of its class to support it: cannot make test episodes"
            )
        return episodes
    if order == "class":
        usable = [c for c in classes if len(pools[c]) >= 2]
        if not usable:
            raise ValueError(f"no class of {classes} has two images: cannot make test episodes")
        episodes = []
        for _ in range(num_episodes):
            c = int(rng.choice(usable))
            query = pools[c][int(rng.integers(len(pools[c])))]
            episodes.append(EpisodeSpec(query, c, draw_supports(rng, pools[c], query, shot)))
        return episodes
    raise ValueError(f"unknown episode order {order!r}: expected 'image', 'pair' or 'class'")


def restrict_index(index: ClassIndex, pairs: dict[str, set[int]] | None) -> ClassIndex:
    """Keep only the (image, class) pairs a list file names (HSNet, BAM lists); None keeps all."""
    if pairs is None:
        return index
    return {i: {c: a for c, a in areas.items() if c in pairs.get(i, ())} for i, areas in index.items()}


def without_classes(index: ClassIndex, allowed: list[int]) -> ClassIndex:
    """Drop every image that shows a class outside `allowed` (BAM's exclusion of novel-class images)."""
    keep = set(allowed)
    return {i: areas for i, areas in index.items() if set(areas) <= keep}


def load_or_create_episodes(cache_dir: Path, name: str, index: ClassIndex, **kwargs) -> list[EpisodeSpec]:
    """Read the saved episode list for these settings, or draw it once and save it."""
    key = json.dumps({k: kwargs[k] for k in sorted(kwargs)}, sort_keys=True, default=list)
    digest = hashlib.sha1((key + json.dumps(index, sort_keys=True)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "episodes" / f"{name}_{digest}.json"
    if path.is_file():
        return [
            EpisodeSpec(e["query"], e["class_id"], tuple(e["supports"]))
            for e in json.loads(path.read_text())["episodes"]
        ]
    episodes = sample_test_episodes(index, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(
        json.dumps({"settings": json.loads(key), "episodes": [asdict(e) for e in episodes]}, indent=0)
    )
    os.replace(tmp, path)
    return episodes
