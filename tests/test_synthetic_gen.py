"""Tests for the built-in synthetic few-shot segmentation benchmark generator."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from fewshotseg.data.sources.synthetic_gen import (
    _CLASS_TABLE,
    _UNIT_EXTENT,
    SHAPES,
    SYNTHETIC_CLASSES,
    VERSION,
    _shape_mask,
    generate_synthetic,
    render_synthetic_sample,
)

SMALL = {"num_train": 40, "num_val": 20, "image_size": 64}


def _ids(root: pathlib.Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _label(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.array(im)


def _all_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> pathlib.Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "small", seed=0, num_workers=0, **SMALL)


@pytest.fixture(scope="module")
def train200(tmp_path_factory) -> pathlib.Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("syn200") / "ds",
        seed=3,
        num_train=200,
        num_val=0,
        image_size=64,
        num_workers=2,
    )


def test_class_table_is_a_genuine_few_shot_design():
    assert len(SYNTHETIC_CLASSES) == 20 and len(set(SYNTHETIC_CLASSES)) == 20
    assert len(_CLASS_TABLE) == 20
    for fold in range(4):
        rows = _CLASS_TABLE[5 * fold : 5 * fold + 5]
        assert len({r[0] for r in rows}) == 5, "every fold holds 5 different shapes"
        assert len({r[1] for r in rows}) == 5, "every fold holds 5 different textures"
        assert len({r[2] for r in rows}) == 5, "every fold holds 5 different colour families"
    for a, b in itertools.combinations(_CLASS_TABLE, 2):
        shared = sum(a[k] == b[k] for k in range(3))
        assert shared <= 1, (a, b)
        assert a[:3] != b[:3] or a[3] != b[3]


def test_unit_shapes_fit_their_extent():
    # rendering only evaluates shapes inside a bounding box of radius _UNIT_EXTENT: nothing may lie outside
    g = np.linspace(-2.0, 2.0, 801)
    u, v = np.meshgrid(g, g)
    outside = np.hypot(u, v) > _UNIT_EXTENT
    for k in range(len(SHAPES)):
        mask = _shape_mask(k, u, v)
        assert mask.mean() > 0.05, SHAPES[k]
        assert not (mask & outside).any(), SHAPES[k]


def test_layout_files_and_labels(small_root: pathlib.Path):
    root = small_root
    train, val = _ids(root, "train"), _ids(root, "val")
    assert train == [f"train_{i:06d}" for i in range(40)]
    assert val == [f"val_{i:06d}" for i in range(20)]
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 60
    assert len(list((root / "SegmentationClassAug").glob("*.png"))) == 60
    assert (root / "classes.txt").read_text().splitlines() == list(SYNTHETIC_CLASSES)
    meta = json.loads((root / "synthetic.json").read_text())
    assert {k: meta[k] for k in ("seed", "num_train", "num_val", "image_size", "version")} == {
        "seed": 0,
        **SMALL,
        "version": VERSION,
    }
    assert not list(root.parent.glob("*.tmp-*")), "temporary build directory left behind"

    saw_ignore = 0
    for sample_id in train + val:
        with Image.open(root / "JPEGImages" / f"{sample_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
        with Image.open(root / "SegmentationClassAug" / f"{sample_id}.png") as im:
            assert im.mode == "P" and im.size == (64, 64)
            pal = im.getpalette()
            assert tuple(pal[3:6]) == (128, 0, 0) and tuple(pal[3 * 255 : 3 * 256]) == (224, 224, 192)
            lab = np.array(im)
        values = set(np.unique(lab).tolist())
        assert values <= set(range(21)) | {255}
        assert values & set(range(1, 21)), "every image holds at least one object"
        saw_ignore += 255 in values
        # the ignore band lies along every outline: no two different labels touch without a 255 between
        h = lab[:, 1:] != lab[:, :-1]
        v = lab[1:, :] != lab[:-1, :]
        for diff, a, b in ((h, lab[:, 1:], lab[:, :-1]), (v, lab[1:, :], lab[:-1, :])):
            pairs = diff & (a != 255) & (b != 255)
            assert not pairs.any(), "two different labels touch without an ignore band between them"
    assert saw_ignore == 60


def test_ignore_band_width():
    _, lab = render_synthetic_sample(0, "train", 0, 128)
    ignore = lab == 255
    assert ignore.any()
    # a band ~2 px wide: it covers a small fraction of the image and objects keep their interior
    assert ignore.mean() < 0.15
    assert ((lab > 0) & (lab < 255)).any()


def test_deterministic_across_worker_counts(tmp_path: pathlib.Path, small_root: pathlib.Path):
    other = generate_synthetic(tmp_path / "b", seed=0, num_workers=2, **SMALL)
    a, b = _all_files(small_root), _all_files(other)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # and identical to an in-memory render (before JPEG) for the label
    _, lab = render_synthetic_sample(0, "val", 7, 64)
    np.testing.assert_array_equal(_label(other / "SegmentationClassAug" / "val_000007.png"), lab)


def test_different_seed_differs():
    a = render_synthetic_sample(0, "train", 0, 64)[1]
    b = render_synthetic_sample(1, "train", 0, 64)[1]
    c = render_synthetic_sample(0, "val", 0, 64)[1]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_idempotent_then_regenerates(tmp_path: pathlib.Path):
    root = tmp_path / "ds"
    params = {"num_train": 12, "num_val": 6, "image_size": 48}
    out = generate_synthetic(str(root), seed=1, num_workers=0, **params)
    assert out == root and isinstance(out, pathlib.Path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    before = _all_files(root)

    assert generate_synthetic(root, seed=1, num_workers=0, **params) == out
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes, "an up-to-date dataset was rewritten"

    # different parameters: regenerated, stale files removed
    generate_synthetic(root, seed=2, num_workers=0, num_train=5, num_val=3, image_size=48)
    meta = json.loads((root / "synthetic.json").read_text())
    assert (meta["seed"], meta["num_train"], meta["num_val"]) == (2, 5, 3)
    assert len(_ids(root, "train")) == 5 and len(_ids(root, "val")) == 3
    assert len(list((root / "JPEGImages").iterdir())) == 8
    assert len(list((root / "SegmentationClassAug").iterdir())) == 8
    after = _all_files(root)
    assert after["SegmentationClassAug/train_000000.png"] != before["SegmentationClassAug/train_000000.png"]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_refuses_to_overwrite_foreign_dataset(tmp_path: pathlib.Path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        generate_synthetic(root, num_train=2, num_val=1, image_size=32, num_workers=0)
    assert (root / "JPEGImages" / "2007_000032.jpg").read_bytes() == b"not ours"


def test_existing_empty_root_is_filled(tmp_path: pathlib.Path):
    root = tmp_path / "empty"
    root.mkdir()
    generate_synthetic(root, num_train=3, num_val=2, image_size=32, num_workers=0)
    assert (root / "synthetic.json").exists() and len(_ids(root, "train")) == 3


def _concurrent_worker(root: str) -> None:
    generate_synthetic(root, seed=5, num_train=16, num_val=8, image_size=32, num_workers=0)


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork for speed")
def test_concurrent_callers(tmp_path: pathlib.Path):
    root = tmp_path / "shared"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_concurrent_worker, args=(str(root),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 5
    assert len(list((root / "JPEGImages").iterdir())) == 24
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    reference = generate_synthetic(
        tmp_path / "ref", seed=5, num_train=16, num_val=8, image_size=32, num_workers=0
    )
    assert _all_files(root) == _all_files(reference)


def test_class_coverage_and_multi_object(train200: pathlib.Path):
    present = np.zeros(21, dtype=int)
    n_multi = 0
    min_frac = 1.0
    for sample_id in _ids(train200, "train"):
        lab = _label(train200 / "SegmentationClassAug" / f"{sample_id}.png")
        ids = [c for c in np.unique(lab).tolist() if 0 < c < 255]
        assert 1 <= len(ids) <= 3
        present[ids] += 1
        n_multi += len(ids) >= 2
        min_frac = min(min_frac, min((lab == c).mean() for c in ids))
    assert (present[1:] > 0).all(), present
    assert present[1:].min() >= 5, present  # uniform class choice: ~19 images per class expected
    assert 0.35 <= n_multi / 200 <= 0.85
    assert min_frac >= 0.01, "every object keeps a reasonable visible (non-ignore) area"


def test_class_colours_are_distinct(train200: pathlib.Path):
    sums = np.zeros((21, 3))
    counts = np.zeros(21)
    for sample_id in _ids(train200, "train"):
        lab = _label(train200 / "SegmentationClassAug" / f"{sample_id}.png")
        with Image.open(train200 / "JPEGImages" / f"{sample_id}.jpg") as im:
            rgb = np.asarray(im, dtype=np.float64)
        for c in range(1, 21):
            m = lab == c
            sums[c] += rgb[m].sum(0)
            counts[c] += m.sum()
    means = sums[1:] / counts[1:, None]
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(20, 1)]
    assert d.min() > 25, d.min()
    assert (d > 45).mean() > 0.9
    # and the background is not coloured like any class: mean background saturation stays low
    lab = _label(train200 / "SegmentationClassAug" / "train_000000.png")
    with Image.open(train200 / "JPEGImages" / "train_000000.jpg") as im:
        hsv = np.asarray(im.convert("HSV"), dtype=np.float64)
    assert hsv[..., 1][lab == 0].mean() < 0.35 * 255


def test_rejects_bad_arguments(tmp_path: pathlib.Path):
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path / "x", seed=-1, num_workers=0)
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path / "x", image_size=8, num_workers=0)
    assert not (tmp_path / "x").exists()


def test_more_workers_than_chunks(tmp_path: pathlib.Path):
    root = generate_synthetic(
        tmp_path / "w", num_train=3, num_val=0, image_size=32, num_workers=os.cpu_count()
    )
    assert len(_ids(root, "train")) == 3 and _ids(root, "val") == []
