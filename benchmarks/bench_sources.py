"""Real-benchmark data pipeline: class-index build times (first build and cached restart) on a
generated COCO-sized annotation file and on a 10k-image VOC-layout folder, COCO label decoding from
the converted store, and loader episodes/s under the pfenet and hsnet protocols.

    python benchmarks/bench.py --only sources [--workdir DIR]   # DIR keeps the generated data

Targets: COCO-sized first build under 60 s on 2 cores, cached restart under 2 s.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from bench import section
from PIL import Image

from fewshotseg.data.datamodule import FewShotDataModule
from fewshotseg.data.index import load_class_index
from fewshotseg.data.sources.coco import COCO20i
from fewshotseg.data.sources.pascal import PascalVOC, VOCLayoutSource

COCO_IMAGES, COCO_INSTANCES = 82_783, 604_907  # instances_train2014.json
VOC_IMAGES = 10_000
WORKERS = 2  # the target is stated for 2 cores


def _category_ids() -> list[int]:
    return [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _column_major_box_runs(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> list[int]:
    """Uncompressed RLE counts (column-major, starting with zeros) of a filled box, as COCO stores crowds."""
    runs = [c0 * h + r0]
    for c in range(c0, c1):
        runs.append(r1 - r0)
        runs.append(h - (r1 - r0) if c < c1 - 1 else h * w - (c1 - 1) * h - r1)
    return runs


def generate_coco_json(path: Path, n_images: int, n_instances: int, seed: int = 0) -> None:
    """A COCO-format file of COCO 2014's size: 8-40-vertex polygons (15 % with two parts), 1 % crowd
    regions as uncompressed RLE, coordinates with two decimals, COCO's image metadata fields."""
    from fewshotseg.data.sources.coco import COCO_CLASSES

    rng = np.random.default_rng(seed)
    cats = _category_ids()
    per_image = rng.multinomial(n_instances, np.full(n_images, 1 / n_images))
    sizes = np.stack([rng.integers(360, 641, n_images), rng.integers(360, 641, n_images)], 1)
    images = [{"license": 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2014/COCO_train2014_{i + 1:012d}.jpg",
               "height": int(h), "width": int(w), "date_captured": "2013-11-14 16:28:13",
               "flickr_url": "http://farm4.staticflickr.com/0/0.jpg", "id": i + 1} for i, (h, w) in enumerate(sizes)]  # fmt: skip
    anns = []
    image_of = np.repeat(np.arange(n_images), per_image)
    radius = np.exp(rng.uniform(np.log(4), np.log(160), n_instances))
    for k in range(n_instances):
        i = int(image_of[k])
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), float(radius[k])
        if rng.random() < 0.01:
            r0, r1 = int(max(0, cy - r)), int(min(h, cy + r)) or 1
            c0, c1 = int(max(0, cx - r)), int(min(w, cx + r)) or 1
            seg = {
                "counts": _column_major_box_runs(h, w, r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)),
                "size": [h, w],
            }
            crowd, area = 1, float((r1 - r0) * (c1 - c0))
        else:
            seg = []
            for part in range(1 if rng.random() < 0.85 else 2):
                n = int(rng.integers(8, 41))
                ang = np.sort(rng.uniform(0, 2 * np.pi, n))
                rad = r * rng.uniform(0.5, 1.0, n)
                ox, oy = (0.0, 0.0) if part == 0 else rng.uniform(-r, r, 2)
                xy = np.stack(
                    [np.clip(cx + ox + rad * np.cos(ang), 0, w), np.clip(cy + oy + rad * np.sin(ang), 0, h)],
                    1,
                )
                seg.append(np.round(xy, 2).ravel().tolist())
            crowd, area = 0, float(np.pi * r * r * 0.56)
        anns.append({"segmentation": seg, "area": round(area, 2), "iscrowd": crowd, "image_id": i + 1,
                     "bbox": [round(cx - r, 2), round(cy - r, 2), round(2 * r, 2), round(2 * r, 2)],
                     "category_id": cats[int(rng.integers(80))], "id": k + 1})  # fmt: skip
    categories = [{"supercategory": "thing", "id": c, "name": n} for c, n in zip(cats, COCO_CLASSES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(
            {
                "info": {"description": "generated"},
                "images": images,
                "licenses": [],
                "annotations": anns,
                "categories": categories,
            },
            f,
        )
    os.replace(tmp, path)


def _write_voc_chunk(args: tuple[str, int, int, int]) -> None:
    root, start, stop, with_images = args
    rng = np.random.default_rng(start)
    palette = (np.arange(256 * 3) * 37 % 256).astype(np.uint8).tolist()
    for n in range(start, stop):
        h, w = (375, 500) if n % 4 else (500, 375)
        label = np.zeros((h, w), np.uint8)
        image = np.full((h, w, 3), 100, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bh, bw = int(rng.integers(10, h // 2)), int(rng.integers(10, w // 2))
            y, x = int(rng.integers(1, h - bh - 1)), int(rng.integers(1, w - bw - 1))
            c = int(rng.integers(1, 21))
            label[y - 1 : y + bh + 1, x - 1 : x + bw + 1] = 255
            label[y : y + bh, x : x + bw] = c
            image[y : y + bh, x : x + bw] = (c * 12, c * 37 % 256, c * 91 % 256)
        im = Image.fromarray(label, mode="P")
        im.putpalette(palette)
        im.save(Path(root) / "SegmentationClassAug" / f"{n:06d}.png")
        if with_images:
            Image.fromarray(image).save(Path(root) / "JPEGImages" / f"{n:06d}.jpg", quality=90)


def generate_voc(root: Path, n: int, with_images: bool) -> None:
    marker = root / f".generated-{n}-{int(with_images)}"
    if marker.exists():
        return
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), s, min(s + 250, n), int(with_images)) for s in range(0, n, 250)]
    with ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(_write_voc_chunk, chunks))
    ids = [f"{i:06d}" for i in range(n)]
    cut = n * 4 // 5
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:cut]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[cut:]) + "\n")
    (root / "ImageSets/Segmentation/all.txt").write_text("\n".join(ids) + "\n")
    marker.touch()


def _clear_cache(root: Path) -> None:
    import shutil

    shutil.rmtree(root / ".fewshotseg_cache", ignore_errors=True)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


@section("sources")
def sources(args) -> list[dict]:
    work = Path(args.workdir)
    rows = [
        {
            "name": f"load average at start (1/5/15 min, {os.cpu_count()} CPUs): {load_average()}",
            "value": os.getloadavg()[0],
            "unit": "load",
        }
    ]

    # COCO-sized annotation file -> class index (+ the converted mask store)
    coco = work / "coco_bench"
    n_img, n_inst = (8_278, 60_490) if args.quick else (COCO_IMAGES, COCO_INSTANCES)
    ann = coco / "annotations" / "instances_train2014.json"
    if not ann.exists() or json.loads(
        (coco / "size.json").read_text() if (coco / "size.json").exists() else "[]"
    ) != [n_img, n_inst]:
        start = time.perf_counter()
        generate_coco_json(ann, n_img, n_inst)
        (coco / "size.json").write_text(json.dumps([n_img, n_inst]))
        rows.append(
            {
                "name": f"(generating the COCO-sized JSON, {ann.stat().st_size / 2**20:.0f} MiB)",
                "value": time.perf_counter() - start,
                "unit": "s",
            }
        )
    _clear_cache(coco)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    index = load_class_index(COCO20i(coco), "train", num_workers=WORKERS)
    first = time.perf_counter() - start
    tag = f"{n_img // 1000}k images, {n_inst // 1000}k instances"
    rows.append({"name": f"COCO index first build ({tag}, {WORKERS} workers)", "value": first, "unit": "s"})
    # CPU seconds do not depend on what else runs: / 2 is the wall time on 2 idle cores if it all overlapped
    rows.append(
        {"name": "  its CPU time (main process + workers)", "value": _cpu_seconds() - cpu, "unit": "CPU s"}
    )
    rows.append(
        {"name": f"  load average after it: {load_average()}", "value": os.getloadavg()[0], "unit": "load"}
    )
    start = time.perf_counter()
    restarted = load_class_index(COCO20i(coco), "train")
    rows.append({"name": "COCO index cached restart", "value": time.perf_counter() - start, "unit": "s"})
    assert restarted == index
    source = COCO20i(coco)
    ids = list(itertools.islice(index, 0, len(index), max(1, len(index) // 300)))
    start = time.perf_counter()
    for i in ids:
        source.load_label(i)
    rows.append(
        {
            "name": "COCO label decode from the store (first use opens it)",
            "value": len(ids) / (time.perf_counter() - start),
            "unit": "labels/s",
        }
    )

    # 10k-image VOC layout -> class index
    voc = work / "voc_bench"
    n_voc = 1_000 if args.quick else VOC_IMAGES
    generate_voc(voc, n_voc, with_images=False)
    _clear_cache(voc)
    src = VOCLayoutSource(voc, splits={"train": "all.txt"}, name="vocbench")
    cpu = _cpu_seconds()
    start = time.perf_counter()
    load_class_index(src, "train", num_workers=WORKERS)
    rows.append(
        {
            "name": f"VOC-layout index first build ({n_voc} labels 500x375, {WORKERS} workers)",
            "value": time.perf_counter() - start,
            "unit": "s",
        }
    )
    rows.append(
        {"name": "  its CPU time (main process + workers)", "value": _cpu_seconds() - cpu, "unit": "CPU s"}
    )
    start = time.perf_counter()
    load_class_index(VOCLayoutSource(voc, splits={"train": "all.txt"}, name="vocbench"), "train")
    rows.append(
        {"name": "VOC-layout index cached restart", "value": time.perf_counter() - start, "unit": "s"}
    )

    # loader throughput under both protocols (PASCAL reader, 500x375 JPEGs)
    pascal = work / "pascal_bench"
    generate_voc(pascal, 400 if args.quick else 1_000, with_images=True)
    batches = 4 if args.quick else 12
    protocols = {
        "pfenet": {"train": "augment", "test": "pad", "size": 473, "scale": [0.9, 1.1], "num_test_episodes": 1000, "test_order": "image", "min_area": 2048, "eval_resolution": "original"},
        "hsnet": {"train": "resize", "test": "resize", "size": 400, "num_test_episodes": 1000, "test_order": "pair", "min_area": 0, "eval_resolution": "input"},
    }  # fmt: skip
    for protocol in ("pfenet", "hsnet"):
        for workers in (0, WORKERS):
            dm = FewShotDataModule(pascal, lambda root: PascalVOC(root, train_list="ImageSets/Segmentation/train.txt"),
                                   protocol=protocol, protocols=protocols, num_workers=workers, batch_size=4, test_batch_size=4)  # fmt: skip
            dm.prepare_data()
            dm.setup(None)

            for phase, fn in (("train", dm.train_dataloader), ("test", dm.test_dataloader)):
                batches_it = iter(fn())
                next(batches_it)  # warm-up: workers started, first files read
                start = time.perf_counter()
                n = sum(b["query_img"].shape[0] for b in itertools.islice(batches_it, batches))
                rows.append(
                    {
                        "name": f"{protocol} {phase} episodes/s (1-shot, workers={workers})",
                        "value": n / (time.perf_counter() - start),
                        "unit": "episodes/s",
                    }
                )
                del batches_it
    rows.append(
        {"name": f"load average at end: {load_average()}", "value": os.getloadavg()[0], "unit": "load"}
    )
    return rows
