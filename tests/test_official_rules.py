"""The authors' rules, each checked against the official formula or library call computed here
independently: the poly schedule, the augmentation ops, PANet's episode sampling, BAM's
novel-image rule in the presets."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.schedules import poly


def _lrs_used(scheduler_factory, total: int, base_lr: float = 0.05) -> list[float]:
    """The lr each optimizer update uses, stepping the scheduler after every update as Lightning does."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = scheduler_factory(opt, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("total", [1, 7, 50])
def test_poly_equals_the_official_loop(total):
    # PFENet/BAM train.py: current_iter = epoch * len(loader) + i + 1, then
    # lr = base_lr * (1 - current_iter / max_iter) ** power, then the update.
    base, power = 0.05, 0.9
    official = [base * (1 - (i + 1) / total) ** power for i in range(total)]
    assert _lrs_used(lambda o, t: poly(o, t, power=power), total, base) == pytest.approx(official, abs=1e-15)
    assert official[-1] == 0.0


PAPER_PRESETS = [
    (method, data)
    for method in ("asgnet", "dpnet", "pfenet", "pspnet_base", "qgnet", "symnet")
    for data in ("pascal", "coco")
]


@pytest.mark.parametrize("data", ["pascal", "coco"])
def test_symnet_presets_exclude_novel_images(data):
    # BAM (and Sym-Net on it) builds its training lists with filter_intersection=True.
    from helpers import compose_config

    assert compose_config("train", ["method=symnet", f"data={data}"]).data.exclude_novel_in_train is True
    assert compose_config("train", [f"experiment=symnet_{data}_r50"]).data.exclude_novel_in_train is True
    # PFENet's lists keep such images (novel objects are background); so does BAM's base stage.
    for method in ("pfenet", "asgnet", "qgnet", "dpnet", "pspnet_base"):
        assert (
            compose_config("train", [f"method={method}", f"data={data}"]).data.exclude_novel_in_train is False
        )


@pytest.mark.parametrize("method,data", PAPER_PRESETS)
def test_paper_presets_train_in_fp32(method, data):
    from helpers import compose_config

    cfg = compose_config("train", [f"method={method}", f"data={data}", "trainer=gpu"])
    assert cfg.trainer.precision == 32
    cfg = compose_config(
        "train", [f"method={method}", f"data={data}", "trainer=gpu", "trainer.precision=bf16-mixed"]
    )
    assert cfg.trainer.precision == "bf16-mixed"  # the user's choice wins


def test_panet_experiment_trains_in_fp32():
    from helpers import compose_config

    assert compose_config("train", ["experiment=panet_pascal", "trainer=gpu"]).trainer.precision == 32
    assert compose_config("train", ["method=panet", "trainer=gpu"]).trainer.precision == "bf16-mixed"


# Augmentation: each op against cv2 / numpy written out here
# ------------------------------------------------------------------------------------------------

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fewshotseg.data import transforms as T  # noqa: E402

MEAN = np.float32([255 * m for m in T.IMAGENET_MEAN])
STD = np.float32([255 * s for s in T.IMAGENET_STD])


def _image(h=23, w=31, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _raw(tensor):
    """Undo the normalisation: the float32 image the ops produced."""
    return tensor.numpy().transpose(1, 2, 0) * STD + MEAN


def test_blur_is_cv2_5x5_sigma0_kernel_1_4_6_4_1():
    image = _image(31, 31)  # the crop size: no padding, crop at (0, 0)
    blur_only = T.train_transform(31, scale=(1.0, 1.0), rotate=0, blur_p=1.0, flip_p=0.0)
    img, _ = blur_only(image, np.zeros((31, 31), np.uint8))
    # the kernel written out: [1, 4, 6, 4, 1] / 16 both ways, border reflect-101 (cv2's default)
    k = np.array([1, 4, 6, 4, 1]) / 16
    x = np.pad(image.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="reflect")
    rows = sum(k[i] * x[i : i + 31] for i in range(5))
    expected = sum(k[j] * rows[:, j : j + 31] for j in range(5))
    assert np.abs(_raw(img) - expected).max() < 1e-3
    assert np.abs(_raw(img) - cv2.GaussianBlur(np.float32(image), (5, 5), 0)).max() < 1e-3
    # sigma 1.1 (the former choice, albumentations) is another kernel
    assert np.abs(_raw(img) - cv2.GaussianBlur(np.float32(image), (5, 5), 1.1)).max() > 0.5


@pytest.mark.parametrize("h,w,s", [(31, 23, 0.9), (23, 31, 1.1), (50, 37, 0.83), (17, 45, 1.25)])
def test_rand_scale_sizes_are_cv2s_rounding(h, w, s):
    image, label = _image(h, w).astype(np.float32), np.zeros((h, w), np.uint8)
    out, (out_label,) = T.rand_scale(np.random.default_rng(0), image, [label], (s, s))
    assert out.shape[:2] == out_label.shape == (round(h * s), round(w * s))
    assert np.array_equal(out, cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR))
    if (31, 0.9) == (h, s):
        assert int(h * s) != round(h * s)  # the case `int(h * s)` got wrong


def test_rotation_is_about_w2_h2():
    n = 12
    label = np.random.default_rng(1).integers(0, 3, (n, n)).astype(np.uint8)
    _, (out,) = T.rotate(np.zeros((n, n, 3), np.float32), [label], 90.0)
    # cv2.getRotationMatrix2D((n/2, n/2), 90, 1) maps (x, y) -> (y, n - x); its inverse on the pixel
    # grid is exact, so the nearest lookup is a plain index; outside the source: 255.
    expected = np.full((n, n), 255, np.uint8)
    for y in range(n):
        for x in range(n):
            sx, sy = n - y, x  # the source pixel of destination (x, y)
            if 0 <= sx < n and 0 <= sy < n:
                expected[y, x] = label[sy, sx]
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, np.rot90(label))  # the centre ((n - 1) / 2, (n - 1) / 2) would give this


class _CountingRng:
    def __init__(self, seed=0):
        self.rng, self.integer_calls = np.random.default_rng(seed), 0

    def integers(self, *args):
        self.integer_calls += 1
        return self.rng.integers(*args)


def test_crop_gets_one_plus_31_draws():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1  # larger than any 20 x 20 crop can keep 85 % of
    rng = _CountingRng()
    T.crop_offset(rng, mask, 20, 0.85, 31)
    assert rng.integer_calls == 2 * 32  # (y, x) per draw
    rng = _CountingRng()
    T.crop_offset(rng, np.zeros((40, 40), np.uint8), 20, 0.85, 31)
    assert rng.integer_calls == 2  # no object: the first crop is kept


def test_train_pipeline_equals_the_official_chain_in_float32():
    """The whole augmentation against the official sequence written out with cv2, the same random
    numbers drawn in the same order; float32 throughout (no rounding to uint8 between ops)."""
    image = _image(40, 52, seed=3)
    mask = np.zeros((40, 52), np.uint8)
    mask[10:30, 12:40] = 1
    mask[0, :] = 255
    size, scale = 45, (0.9, 1.1)
    transform = T.train_transform(size, scale=scale, rotate=10.0, blur_p=0.5, flip_p=0.5)
    for seed in range(12):
        transform.set_seed(seed)
        img, out = transform(image, mask)
        rng = np.random.default_rng(seed)
        x, y = np.float32(image), mask
        s = scale[0] + (scale[1] - scale[0]) * rng.random()
        x = cv2.resize(x, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        y = cv2.resize(y, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
        if rng.random() < 0.5:
            angle = -10 + 20 * rng.random()
            m = cv2.getRotationMatrix2D((y.shape[1] / 2, y.shape[0] / 2), angle, 1)
            x = cv2.warpAffine(
                x,
                m,
                y.shape[::-1],
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=tuple(float(v) for v in MEAN),
            )
            y = cv2.warpAffine(
                y, m, y.shape[::-1], flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=255
            )
        if rng.random() < 0.5:
            x = cv2.GaussianBlur(x, (5, 5), 0)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        ph, pw = max(size - y.shape[0], 0), max(size - y.shape[1], 0)
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        x = np.stack([np.pad(x[..., c], pads, constant_values=MEAN[c]) for c in range(3)], -1)
        y = np.pad(y, pads, constant_values=255)
        total = (y == 1).sum()
        for _ in range(32):
            oy, ox = rng.integers(y.shape[0] - size + 1), rng.integers(y.shape[1] - size + 1)
            if (y[oy : oy + size, ox : ox + size] == 1).sum() >= 0.85 * total:
                break
        assert np.array_equal(out.numpy(), y[oy : oy + size, ox : ox + size]), seed
        assert np.abs(_raw(img) - x[oy : oy + size, ox : ox + size]).max() < 1e-3, seed
    assert not np.allclose(_raw(img), _raw(img).round(), atol=1e-3)  # not rounded to integers


# PANet's class-first episodes
# ------------------------------------------------------------------------------------------------

from collections import Counter  # noqa: E402

from fewshotseg.data.sampling import draw_train_episode, images_per_class, query_images  # noqa: E402

# A skewed index: class 1 is in every image, classes 2..4 in a few each.
SKEWED = {f"img{i:02d}": {1: 500, **({2 + i % 3: 300} if i < 9 else {})} for i in range(30)}
CLASSES = [1, 2, 3, 4]


def _frequencies(order: str, shot: int, n: int = 6000) -> tuple[Counter, list]:
    rng = np.random.default_rng(0)
    pools = images_per_class(SKEWED, CLASSES)
    queries = query_images(SKEWED, CLASSES)
    specs = [draw_train_episode(rng, order, queries[i % len(queries)], SKEWED, pools, shot) for i in range(n)]
    return Counter(s.class_id for s in specs), specs


def test_class_first_draws_classes_uniformly_and_distinct_images():
    counts, specs = _frequencies("class", shot=2)
    n = sum(counts.values())
    for c in CLASSES:  # PANet: random.sample of the classes, 1 / 4 each (3 sigma ~ 0.017)
        assert abs(counts[c] / n - 1 / len(CLASSES)) < 0.02, counts
    for s in specs:
        assert s.class_id in SKEWED[s.query] and all(s.class_id in SKEWED[i] for i in s.supports)
        assert len({s.query, *s.supports}) == 3  # shot + 1 distinct images


def test_image_first_follows_the_images():
    # PFENet: the i-th image, then one of its classes: p(c) = mean over images of 1[c in it] / |classes in it|
    counts, _ = _frequencies("image", shot=1)
    n = sum(counts.values())
    expected = {c: statistics.fmean((c in a) / len(a) for a in SKEWED.values()) for c in CLASSES}
    for c in CLASSES:
        assert abs(counts[c] / n - expected[c]) < 0.02, (counts, expected)
    assert expected[1] > 0.8  # far from uniform: what class-first changes


def test_panet_protocol_composes():
    from helpers import compose_config

    cfg = compose_config("train", ["experiment=panet_pascal", "paths.data_dir=/unused"])
    assert cfg.data.protocol == "panet" and cfg.selection == "last" and cfg.data.test_seed == 1234
    assert cfg.data.test_split == cfg.data.train_split == "train" and cfg.data.fold_split == "consecutive"
    settings = cfg.data.protocols.panet
    assert (settings.train, settings.test, settings.size, settings.test_order, settings.train_order) == (
        "resize_flip", "resize", 417, "class", "class")  # fmt: skip
    assert (settings.min_area, settings.eval_resolution, settings.num_test_episodes) == (0, "input", 1000)


EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_experiment_trains_in_fp32(name):
    from helpers import compose_config

    assert compose_config("train", [f"experiment={name}", "trainer=gpu"]).trainer.precision == 32
