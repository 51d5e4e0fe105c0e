"""On-disk fixtures of the dataset sources: VOC, COCO and FSS-1000 layouts written into a folder
(used by test_sources, test_protocol and test_cli_asgnet), and the protocol's fold tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from fewshotseg.data.sources.synthetic_gen import voc_palette

# The fold class lists of PFENet's and HSNet's code (docs/protocols.md), transcribed row by row.
PASCAL_FOLDS = """
| 0 | 1 aeroplane, 2 bicycle, 3 bird, 4 boat, 5 bottle |
| 1 | 6 bus, 7 car, 8 cat, 9 chair, 10 cow |
| 2 | 11 diningtable, 12 dog, 13 horse, 14 motorbike, 15 person |
| 3 | 16 pottedplant, 17 sheep, 18 sofa, 19 train, 20 tvmonitor |
"""
COCO_INTERLEAVED = """
| 0 | 1 person, 5 airplane, 9 boat, 13 parking meter, 17 dog, 21 elephant, 25 backpack, 29 suitcase, 33 sports ball, 37 skateboard, 41 wine glass, 45 spoon, 49 sandwich, 53 hot dog, 57 chair, 61 dining table, 65 mouse, 69 microwave, 73 refrigerator, 77 scissors |
| 1 | 2 bicycle, 6 bus, 10 traffic light, 14 bench, 18 horse, 22 bear, 26 umbrella, 30 frisbee, 34 kite, 38 surfboard, 42 cup, 46 bowl, 50 orange, 54 pizza, 58 couch, 62 toilet, 66 remote, 70 oven, 74 book, 78 teddy bear |
| 2 | 3 car, 7 train, 11 fire hydrant, 15 bird, 19 sheep, 23 zebra, 27 handbag, 31 skis, 35 baseball bat, 39 tennis racket, 43 fork, 47 banana, 51 broccoli, 55 donut, 59 potted plant, 63 tv, 67 keyboard, 71 toaster, 75 clock, 79 hair drier |
| 3 | 4 motorcycle, 8 truck, 12 stop sign, 16 cat, 20 cow, 24 giraffe, 28 tie, 32 snowboard, 36 baseball glove, 40 bottle, 44 knife, 48 apple, 52 carrot, 56 cake, 60 bed, 64 laptop, 68 cell phone, 72 sink, 76 vase, 80 toothbrush |
"""
COCO_CONSECUTIVE = """
| 0 | 1 person, 2 bicycle, 3 car, 4 motorcycle, 5 airplane, 6 bus, 7 train, 8 truck, 9 boat, 10 traffic light, 11 fire hydrant, 12 stop sign, 13 parking meter, 14 bench, 15 bird, 16 cat, 17 dog, 18 horse, 19 sheep, 20 cow |
| 1 | 21 elephant, 22 bear, 23 zebra, 24 giraffe, 25 backpack, 26 umbrella, 27 handbag, 28 tie, 29 suitcase, 30 frisbee, 31 skis, 32 snowboard, 33 sports ball, 34 kite, 35 baseball bat, 36 baseball glove, 37 skateboard, 38 surfboard, 39 tennis racket, 40 bottle |
| 2 | 41 wine glass, 42 cup, 43 fork, 44 knife, 45 spoon, 46 bowl, 47 banana, 48 apple, 49 sandwich, 50 orange, 51 broccoli, 52 carrot, 53 hot dog, 54 pizza, 55 donut, 56 cake, 57 chair, 58 couch, 59 potted plant, 60 bed |
| 3 | 61 dining table, 62 toilet, 63 tv, 64 laptop, 65 mouse, 66 remote, 67 keyboard, 68 cell phone, 69 microwave, 70 oven, 71 toaster, 72 sink, 73 refrigerator, 74 book, 75 clock, 76 vase, 77 scissors, 78 teddy bear, 79 hair drier, 80 toothbrush |
"""
# The COCO category ids (1..90 with gaps), in the order of the contiguous ids 1..80.
COCO_CATEGORY_IDS = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def parse_folds(table: str) -> list[list[tuple[int, str]]]:
    folds = []
    for line in table.strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        folds.append([(int(x.split(" ", 1)[0]), x.split(" ", 1)[1]) for x in cells[1].split(", ")])
    return folds


def coco_names() -> list[str]:
    by_id = dict(pair for fold in parse_folds(COCO_CONSECUTIVE) for pair in fold)
    return [by_id[i] for i in range(1, 81)]


# --- on-disk fixtures ------------------------------------------------------------------------------
def save_palette_png(label: np.ndarray, path: Path) -> None:
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def draw_box(
    label: np.ndarray, image: np.ndarray, y0: int, x0: int, h: int, w: int, cls: int, border: bool = True
) -> None:
    """An object with VOC's 255 outline (1 px around it)."""
    if border:
        label[max(0, y0 - 1) : y0 + h + 1, max(0, x0 - 1) : x0 + w + 1] = 255
    label[y0 : y0 + h, x0 : x0 + w] = cls
    image[y0 : y0 + h, x0 : x0 + w] = (cls * 12 % 256, cls * 37 % 256, cls * 91 % 256)


BIG, SMALL = (48, 48), (12, 12)  # 2304 px (passes the 2048-px rule) and 144 px (does not)


def make_voc(root: Path) -> dict:
    """VOC 2012 layout: 45 val images, 40 VOC train, 40 SBD train_noval ids (10 of them duplicates of
    VOC train, 5 of them VOC val images that must not be trained on). Image i shows a big object of
    class i % 20 + 1 and a small object of class (7 i + 3) % 20 + 1."""
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = {"val": [f"2007_{i:06d}" for i in range(45)], "train": [f"2008_{i:06d}" for i in range(40)]}
    sbd_only = [f"2009_{i:06d}" for i in range(25)]
    truth = {}
    for n, image_id in enumerate(ids["val"] + ids["train"] + sbd_only):
        h, w = (60, 80) if n % 3 else (80, 62)
        label = np.zeros((h, w), np.uint8)
        image = np.full((h, w, 3), 90, np.uint8)
        big, small = n % 20 + 1, (7 * n + 3) % 20 + 1
        draw_box(label, image, 2, 2, *BIG, big)
        if small != big:
            draw_box(label, image, h - 14, w - 14, *SMALL, small)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_palette_png(label, root / "SegmentationClassAug" / f"{image_id}.png")
        truth[image_id] = label
    lists = root / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (lists / "train.txt").write_text("\n".join(ids["train"]) + "\n")
    sbd = ids["train"][:10] + sbd_only + ids["val"][:5]
    (lists / "sbd_train_noval.txt").write_text("\n".join(sbd) + "\n")
    return {"val": ids["val"], "train": ids["train"] + sbd_only, "labels": truth}


def polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_coco(root: Path, n_images: int = 36, year: int = 2014) -> dict:
    """COCO layout with 80 categories (real ids and names). Every image has 2-4 instances: polygons
    (one with two parts, one with a degenerate 2-point part), a compressed RLE, an uncompressed crowd
    RLE; instances overlap across and within classes. The last image of each split has no annotations."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    truth = {}
    for split in ("train", "val"):
        (root / f"{split}{year}").mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n_images):
            h, w = (64, 80) if i % 2 else (72, 56)
            image_id = 1000 * (split == "val") + i + 1
            name = f"COCO_{split}{year}_{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / f"{split}{year}" / name
            )
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            if i == n_images - 1:
                continue  # an image without annotations: not part of the split
            classes = rng.choice(80, size=int(rng.integers(2, 5)), replace=False)
            for k, c in enumerate(classes):
                cat = COCO_CATEGORY_IDS[int(c)]
                x0, y0 = float(rng.integers(0, w // 2)), float(rng.integers(0, h // 2))
                x1, y1 = min(w, x0 + rng.integers(8, w)), min(h, y0 + rng.integers(8, h))
                kind = (i + k) % 4
                if kind == 0:
                    seg = [polygon(x0, y0, x1, y1)]
                elif kind == 1:  # two parts and a degenerate one
                    seg = [
                        polygon(x0, y0, (x0 + x1) / 2, y1),
                        polygon(x1 - 3, y0, x1, y0 + 5),
                        [x0, y0, x1, y1],
                    ]
                else:
                    m = np.zeros((h, w), np.uint8, order="F")
                    m[int(y0) : int(y1), int(x0) : int(x1)] = 1
                    m[int(y0) : int(y0) + 3, :] = 1  # a thin stripe across: overlaps others
                    if kind == 2:  # compressed RLE, as written by pycocotools
                        rle = mask_utils.encode(np.asfortranarray(m))
                        seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                    else:  # uncompressed RLE (COCO stores crowd regions like this)
                        flat = m.ravel(order="F")
                        edges = np.flatnonzero(np.diff(flat)) + 1
                        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
                        seg = {"size": [h, w], "counts": ([0] + runs) if flat[0] else runs}
                rle = _rle(seg, h, w)
                anns.append({"id": len(anns) + 1 + 100000 * (split == "val"), "image_id": image_id, "category_id": cat,
                             "iscrowd": int(kind == 3), "area": float(mask_utils.area(rle)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "segmentation": seg})  # fmt: skip
        cats = [
            {"id": cid, "name": n, "supercategory": "thing"}
            for cid, n in zip(COCO_CATEGORY_IDS, coco_names())
        ]
        rng.shuffle(anns)  # the JSON order must not matter
        data = {"info": {}, "images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
        truth[split] = data
    return truth


def _rle(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": seg["size"], "counts": seg["counts"].encode()}


def coco_reference_label(data: dict, image: dict, crowd: str = "foreground") -> np.ndarray:
    """Paint an image's instances by hand: larger `area` first, smaller on top (ties: annotation id)."""
    h, w = image["height"], image["width"]
    cat_to_class = {cid: i + 1 for i, cid in enumerate(COCO_CATEGORY_IDS)}
    anns = sorted(
        (a for a in data["annotations"] if a["image_id"] == image["id"]), key=lambda a: (-a["area"], a["id"])
    )
    label = np.zeros((h, w), np.uint8)
    for a in anns:
        m = mask_utils.decode(_rle(a["segmentation"], h, w)).astype(bool)
        label[m] = 255 if (a["iscrowd"] and crowd == "ignore") else cat_to_class[a["category_id"]]
    return label


def make_fss(root: Path, per_split: dict[str, list[str]], images_per_class: int = 4) -> None:
    (root / "splits").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, names in per_split.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            (root / name).mkdir(exist_ok=True)
            for n in range(1, images_per_class + 1):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / name / f"{n}.jpg"
                )
                m = np.zeros((32, 32), np.uint8)
                m[4 : 4 + 3 * n, 5:25] = 255
                m[30, 30] = 100  # grey below 128: background
                Image.fromarray(m).save(root / name / f"{n}.png")


FSS_SPLITS = {
    "trn": ["zebra_crossing", "abacus", "bus"],
    "val": ["dog", "cat"],
    "test": ["kite", "apple", "tie"],
}
