"""Built-in synthetic few-shot segmentation benchmark, written to disk in the PASCAL VOC layout.

The benchmark has 20 classes (ids 1..20, split into 4 folds of 5 consecutive classes like PASCAL-5i).
Every class is a fixed combination of a *shape*, a *texture* and a *colour*; objects of a class vary in
size, aspect, rotation, position, brightness and hue. Each image shows 1 to 3 objects of distinct classes
on a smooth, muted background, so segmenting "the salient object" is not enough: a support example is
needed to tell which object is meant.

Layout written under ``root`` (identical to what the VOC reader expects)::

    JPEGImages/{id}.jpg                  RGB JPEG, quality 95, image_size x image_size
    SegmentationClassAug/{id}.png        8-bit palette PNG ("P" mode, VOC palette): 0 background,
                                         1..20 class ids, 255 ignore band (~2 px) along object outlines
    ImageSets/Segmentation/train.txt     ids ``train_000000`` ...
    ImageSets/Segmentation/val.txt       ids ``val_000000`` ...
    classes.txt                          the 20 class names, one per line, in id order
    synthetic.json                       generation parameters; written last (completion marker)

The bytes of every image and label depend only on ``(seed, split, index, image_size, VERSION)`` (for fixed
numpy / Pillow versions): each image uses its own
``numpy.random.default_rng([seed, split_code, index])``, so the result does not depend on the number of
worker processes.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import json
import logging
import multiprocessing as mp
import os
import pathlib
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

__all__ = ["SYNTHETIC_CLASSES", "VERSION", "generate_synthetic", "render_synthetic_sample", "voc_palette"]

log = logging.getLogger(__name__)

#: Bump whenever the rendering changes the bytes of any written file.
VERSION = 1

IGNORE_INDEX = 255
SPLIT_CODES = {"train": 0, "val": 1}
MARKER = "synthetic.json"
_MANAGED = ("JPEGImages", "SegmentationClassAug", "ImageSets", "classes.txt")
_INCOMPLETE = ".synthetic-incomplete"
_CHUNK = 32  # images per worker task

# ----------------------------------------------------------------------------------------------------
# Class definitions
# ----------------------------------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "cross", "ring", "star", "ellipse", "diamond", "heart", "crescent")
TEXTURES = ("solid", "striped", "checkered", "dotted", "concentric", "gradient")
# Colour families: (name, HSV hue in degrees). Every family is used twice: once bright, once dark.
HUES = (
    ("red", 0.0),
    ("orange", 28.0),
    ("yellow", 55.0),
    ("lime", 90.0),
    ("green", 130.0),
    ("teal", 172.0),
    ("azure", 203.0),
    ("blue", 235.0),
    ("violet", 272.0),
    ("magenta", 312.0),
)
_BRIGHT_SV = (0.9, 0.95)
_DARK_SV = (0.95, 0.62)

# (shape, texture, hue family, dark) per class, class id = row index + 1. Chosen (by a small search) so
# that every fold of 5 consecutive classes has 5 different shapes, 5 different textures and 5 different
# colour families, no two classes share more than one of (shape, texture, colour family), and classes
# sharing a shape have opposite hues (bright vs dark as well).
_CLASS_TABLE: tuple[tuple[int, int, int, bool], ...] = (
    # fold 0: classes 1-5
    (0, 5, 0, False),  # red gradient disc
    (1, 1, 2, False),  # yellow striped square
    (2, 4, 4, False),  # green concentric triangle
    (3, 3, 6, False),  # azure dotted cross
    (4, 2, 8, False),  # violet checkered ring
    # fold 1: classes 6-10
    (5, 1, 1, False),  # orange striped star
    (6, 5, 3, False),  # lime gradient ellipse
    (7, 4, 5, False),  # teal concentric diamond
    (8, 2, 7, False),  # blue checkered heart
    (9, 0, 9, False),  # magenta solid crescent
    # fold 2: classes 11-15
    (0, 3, 5, True),  # dark teal dotted disc
    (3, 0, 1, True),  # dark orange solid cross
    (1, 4, 7, True),  # dark blue concentric square
    (4, 1, 3, True),  # dark lime striped ring
    (2, 2, 9, True),  # dark magenta checkered triangle
    # fold 3: classes 16-20
    (7, 0, 0, True),  # dark red solid diamond
    (8, 4, 2, True),  # dark yellow concentric heart
    (6, 3, 8, True),  # dark violet dotted ellipse
    (5, 5, 6, True),  # dark azure gradient star
    (9, 1, 4, True),  # dark green striped crescent
)


def _class_name(shape: int, texture: int, hue: int, dark: bool) -> str:
    colour = ("dark " if dark else "") + HUES[hue][0]
    return f"{colour} {TEXTURES[texture]} {SHAPES[shape]}"


SYNTHETIC_CLASSES: tuple[str, ...] = tuple(_class_name(*row) for row in _CLASS_TABLE)
NUM_CLASSES = len(SYNTHETIC_CLASSES)


def _base_hsv(hue: int, dark: bool) -> tuple[float, float, float]:
    s, v = _DARK_SV if dark else _BRIGHT_SV
    return HUES[hue][1] / 360.0, s, v


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colormap as a flat 768-entry list (index 255 -> (224, 224, 192))."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


_PALETTE = voc_palette()

# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

_STAR_IN = 0.45  # inner radius of the star
_UNIT_EXTENT = 1.2  # every unit shape lies within this radius of the origin (tested)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit shape (fits in roughly [-1, 1]^2) in local coordinates ``(u, v)``."""
    name = SHAPES[shape]
    if name == "disc":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if name == "triangle":  # equilateral, circumradius 1, inradius 0.5
        s3 = np.sqrt(3.0) / 2.0
        return (v <= 0.5) & (s3 * u - 0.5 * v <= 0.5) & (-s3 * u - 0.5 * v <= 0.5)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.56**2)
    if name == "star":  # 5-pointed, straight edges
        r = np.hypot(u, v)
        sector = 2.0 * np.pi / 5.0
        phi = np.mod(np.arctan2(v, u) + np.pi / 2.0, sector)  # a tip points "up"
        phi = np.where(phi > sector / 2.0, sector - phi, phi)
        x, y = r * np.cos(phi), r * np.sin(phi)
        # edge from the tip (1, 0) to the inner vertex (ri cos(s/2), ri sin(s/2)); origin is inside
        px, py = _STAR_IN * np.cos(sector / 2.0), _STAR_IN * np.sin(sector / 2.0)
        return (px - 1.0) * y - py * (x - 1.0) >= 0.0
    if name == "ellipse":
        return u * u + (v / 0.52) ** 2 <= 1.0
    if name == "diamond":  # elongated rhombus (not a rotated square)
        return np.abs(u) / 0.62 + np.abs(v) <= 1.0
    if name == "heart":
        x = u * 1.15
        y = -v * 1.15 + 0.12
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if name == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.82**2)
    raise ValueError(name)


@functools.cache
def _unit_area(shape: int) -> float:
    n = 400
    g = (np.arange(n) + 0.5) / n * 2.6 - 1.3
    u, v = np.meshgrid(g, g)
    return float(_shape_mask(shape, u, v).mean() * 2.6 * 2.6)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _cos_field(rng: np.random.Generator, t: np.ndarray, fmax: float) -> np.ndarray:
    """``cos(2 pi (fx x + fy y) + phase)`` on the grid ``t x t`` (t in [0, 1)), via the separable identity."""
    fx, fy = rng.uniform(-fmax, fmax, size=2)
    a = 2 * np.pi * fx * t + rng.uniform(0.0, 2 * np.pi)
    b = 2 * np.pi * fy * t
    return np.cos(b)[:, None] * np.cos(a)[None, :] - np.sin(b)[:, None] * np.sin(a)[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth, muted, low-saturation background: base tint + low-frequency cosine fields."""
    t = (np.arange(size) + 0.5) / size
    base = _hsv(rng.random(), rng.uniform(0.02, 0.16), rng.uniform(0.35, 0.75))
    lum = np.zeros((size, size))
    for _ in range(4):
        lum += rng.uniform(0.02, 0.07) * _cos_field(rng, t, 1.6)
    img = np.empty((size, size, 3))
    for c in range(3):  # faint per-channel (chroma) variation keeps the saturation low
        img[..., c] = base[c] + lum + rng.uniform(0.0, 0.03) * _cos_field(rng, t, 1.2)
    return img


def _texture_pattern(
    texture: str,
    rng: np.random.Generator,
    size: int,
    dx: np.ndarray,
    dy: np.ndarray,
    theta: float,
    u: np.ndarray,
) -> np.ndarray:
    """Mixing weight in [0, 1] between base colour (0) and secondary colour (1); dx, dy: pixel offsets
    from the object centre, u: local shape coordinate."""
    period = size * rng.uniform(0.075, 0.11)
    phase = rng.uniform(0.0, period)
    if texture == "solid":
        return np.zeros_like(dx)
    if texture == "striped":
        a = rng.uniform(0.0, np.pi)
        s = dx * np.cos(a) + dy * np.sin(a) + phase
        return (np.mod(s, period) < period * 0.5).astype(np.float64)
    c, s = np.cos(theta), np.sin(theta)
    pu = c * dx + s * dy + phase
    pv = -s * dx + c * dy + rng.uniform(0.0, period)
    if texture == "checkered":
        return (np.mod(np.floor(pu / period) + np.floor(pv / period), 2.0)).astype(np.float64)
    if texture == "dotted":
        qu = np.mod(pu, period) - period / 2.0
        qv = np.mod(pv, period) - period / 2.0
        return (qu * qu + qv * qv <= (0.3 * period) ** 2).astype(np.float64)
    if texture == "concentric":
        r = np.hypot(dx, dy) + phase
        return (np.mod(r, period) < period * 0.5).astype(np.float64)
    if texture == "gradient":  # secondary at one end of the object, base at the other
        return np.clip((1.0 - u) / 2.0, 0.0, 1.0)
    raise ValueError(texture)


def outline(label: np.ndarray) -> np.ndarray:
    """True where a pixel's 3x3 neighbourhood holds another label (a ~2 px band on outlines)."""
    h, w = label.shape
    padded = np.pad(label, 1, mode="edge")
    edge = np.zeros(label.shape, dtype=bool)
    for oy in (0, 1, 2):
        for ox in (0, 1, 2):
            if oy == 1 and ox == 1:
                continue
            edge |= padded[oy : oy + h, ox : ox + w] != label
    return edge


def _ignore_band(label: np.ndarray) -> np.ndarray:
    """Set to 255 every pixel of the outline band."""
    out = label.copy()
    out[outline(label)] = IGNORE_INDEX
    return out


def _num_objects(rng: np.random.Generator) -> int:
    return int(rng.choice(3, p=(0.35, 0.35, 0.30))) + 1


def render_synthetic_sample(
    seed: int, split: str, index: int, image_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample in memory: ``(image uint8 HxWx3, label uint8 HxW)`` exactly as written to disk
    (the image before JPEG compression)."""
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    image, label = render_objects(rng, int(image_size), _CLASS_TABLE)
    return image, _ignore_band(label.astype(np.uint8))


def render_objects(
    rng: np.random.Generator, size: int, table: tuple[tuple[int, int, int, bool], ...]
) -> tuple[np.ndarray, np.ndarray]:
    """1 to 3 objects of distinct categories of `table` (rows: shape, texture, hue family, dark) on a
    background: ``(image uint8 HxWx3, label int64 HxW)``, label = row index + 1, 0 background, no
    ignore band yet. The benchmark draws from its 20 classes, the pre-training corpus from all 1200."""
    coords = np.arange(size) + 0.5  # pixel centres
    img = _background(rng, size)
    label = np.zeros((size, size), dtype=np.int64)
    npix = size * size
    min_area = 0.035 * npix  # in-image area of a new object, and visible area an earlier one must keep

    n_obj = _num_objects(rng)
    classes = rng.choice(len(table), size=n_obj, replace=False)
    owners = np.full((size, size), -1, dtype=np.int64)  # which placed object owns each pixel
    own_areas: list[int] = []
    visible: list[int] = []
    for cls in classes:
        shape, texture, hue_family, dark = table[int(cls)]
        placed = False
        for _attempt in range(30):
            area_frac = float(np.exp(rng.uniform(np.log(0.04), np.log(0.30))))
            radius = np.sqrt(area_frac * npix / _unit_area(shape))
            aspect = float(np.exp(rng.uniform(-0.18, 0.18)))
            theta = float(rng.uniform(0.0, 2.0 * np.pi))
            margin = 0.55 * radius
            lo, hi = (margin, size - margin) if size > 2 * margin else (size / 2.0, size / 2.0)
            cx, cy = rng.uniform(lo, hi, size=2)
            # work in the object's bounding box only
            ext = _UNIT_EXTENT * radius * np.sqrt(max(aspect, 1.0 / aspect)) + 1.0
            x0, x1 = max(0, int(cx - ext)), min(size, int(np.ceil(cx + ext)) + 1)
            y0, y1 = max(0, int(cy - ext)), min(size, int(np.ceil(cy + ext)) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            dx, dy = np.meshgrid(coords[x0:x1] - cx, coords[y0:y1] - cy)
            c, s = np.cos(theta), np.sin(theta)
            u = (c * dx + s * dy) / (radius * np.sqrt(aspect))
            v = (-s * dx + c * dy) / (radius / np.sqrt(aspect))
            mask = _shape_mask(shape, u, v)
            area = int(mask.sum())
            if area < min_area:
                continue
            # earlier objects must stay clearly visible once this one is drawn on top
            covered = owners[y0:y1, x0:x1][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(own_areas))
            if any(visible[k] - lost[k] < max(min_area, 0.4 * own_areas[k]) for k in range(len(own_areas))):
                continue
            placed = True
            break
        if not placed:  # rare: give up on this object rather than bias the layout
            continue

        # colour: class base colour with per-object jitter in hue / saturation / brightness
        h, sat, val = _base_hsv(hue_family, dark)
        h += rng.uniform(-0.014, 0.014)
        sat *= rng.uniform(0.9, 1.05)
        val *= rng.uniform(0.86, 1.1)
        base = _hsv(h, sat, val)
        secondary = base * 0.5 if dark else 0.5 * base + 0.5  # darker shade / lighter tint of the hue
        w = _texture_pattern(TEXTURES[texture], rng, size, dx, dy, theta, u)
        shade = 1.0 + 0.06 * np.clip(u * c + v * s, -1.0, 1.0)  # soft lighting
        colour = (base + (secondary - base) * w[..., None]) * shade[..., None]
        img[y0:y1, x0:x1][mask] = colour[mask]
        label[y0:y1, x0:x1][mask] = int(cls) + 1
        for k in range(len(own_areas)):
            visible[k] -= int(lost[k])
        owners[y0:y1, x0:x1][mask] = len(own_areas)
        own_areas.append(area)
        visible.append(area)

    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 0.012  # sensor-like noise
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return image, label


def _write_chunk(out_dir: str, seed: int, split: str, start: int, stop: int, image_size: int) -> int:
    """Render and write images ``start..stop-1`` of ``split`` (top-level so that it pickles under spawn)."""
    out = pathlib.Path(out_dir)
    for index in range(start, stop):
        image, label = render_synthetic_sample(seed, split, index, image_size)
        sample_id = f"{split}_{index:06d}"
        Image.fromarray(image).save(
            out / "JPEGImages" / f"{sample_id}.jpg", format="JPEG", quality=95, subsampling=0
        )
        lab = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        lab.putpalette(_PALETTE)
        lab.save(out / "SegmentationClassAug" / f"{sample_id}.png", format="PNG")
    return stop - start


# ----------------------------------------------------------------------------------------------------
# Writing / installing
# ----------------------------------------------------------------------------------------------------


def _params(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "version": VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }


def _read_marker(root: pathlib.Path, marker: str = MARKER) -> dict | None:
    try:
        with open(root / marker, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _matches(root: pathlib.Path, params: dict, marker: str = MARKER) -> bool:
    data = _read_marker(root, marker)
    return data is not None and all(data.get(k) == v for k, v in params.items())


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container / taskset limits
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    """Inter-process lock (POSIX ``flock``; released automatically if the holder dies). No-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on the temp-dir + rename protocol alone
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build(tmp: pathlib.Path, params: dict, num_workers: int) -> None:
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    seed, size = params["seed"], params["image_size"]
    tasks = [
        (str(tmp), seed, split, start, min(start + _CHUNK, n), size)
        for split, n in (("train", params["num_train"]), ("val", params["num_val"]))
        for start in range(0, n, _CHUNK)
    ]
    workers = min(num_workers, len(tasks))
    if workers <= 1 or mp.current_process().daemon:  # daemonic processes may not have children
        for task in tasks:
            _write_chunk(*task)
    else:
        # fork is cheap (no re-import) and what torch's DataLoader uses on Linux; the worker does not
        # touch torch/CUDA. Elsewhere use spawn (the worker function is a top-level, picklable function).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_chunk, *task) for task in tasks]
            for fut in futures:
                fut.result()  # re-raise worker errors
    for split, n in (("train", params["num_train"]), ("val", params["num_val"])):
        ids = "".join(f"{split}_{i:06d}\n" for i in range(n))
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids, encoding="utf-8")
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTHETIC_CLASSES), encoding="utf-8")
    meta = dict(params, num_classes=NUM_CLASSES, classes=list(SYNTHETIC_CLASSES), ignore_index=IGNORE_INDEX)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _install(
    tmp: pathlib.Path, root: pathlib.Path, params: dict, marker: str, managed: tuple[str, ...]
) -> None:
    """Move the finished build ``tmp`` into ``root``; the marker is always the last thing to appear."""
    if not root.exists():
        try:
            os.replace(tmp, root)  # atomic rename of the whole directory
            return
        except OSError:
            if not root.exists():
                raise
            # another process created root meanwhile
            if _matches(root, params, marker):
                shutil.rmtree(tmp, ignore_errors=True)
                return
    # root exists (empty, stale synthetic data, or another process' older parameters): swap entries
    (root / _INCOMPLETE).touch()
    _remove(root / marker)
    for name in managed:
        _remove(root / name)
        os.replace(tmp / name, root / name)
    os.replace(tmp / marker, root / marker)
    _remove(root / _INCOMPLETE)
    shutil.rmtree(tmp, ignore_errors=True)


def build_once(
    root: pathlib.Path,
    params: dict,
    build: Callable[[pathlib.Path], None],
    *,
    marker: str = MARKER,
    managed: tuple[str, ...] = _MANAGED,
    what: str = "synthetic data",
) -> bool:
    """Run `build(tmp)` in a temporary sibling of `root` and move the result into `root`, unless
    `root/marker` already records `params`. Under an inter-process lock, so concurrent callers (DDP
    ranks, two runs) build once and never see a half-written folder marked complete. `build` writes
    the `managed` entries and, last, `marker`. Returns True when it built."""
    if _matches(root, params, marker):
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if _matches(root, params, marker):  # another process finished it while we waited
            return False
        if root.exists() and not (root / marker).exists() and not (root / _INCOMPLETE).exists():
            clash = [name for name in managed if (root / name).exists()]
            if clash:
                raise FileExistsError(
                    f"{root} holds {clash} but no {marker}: refusing to overwrite what is not {what}"
                )
        tmp = root.parent / f"{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            _install(tmp, root, params, marker, managed)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return True


def generate_synthetic(
    root,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 500,
    image_size: int = 128,
    num_workers: int | None = None,
) -> pathlib.Path:
    """Write the benchmark under `root` (created if needed) and return root as a Path.

    Returns immediately if ``root/synthetic.json`` already records the same parameters (and VERSION);
    regenerates (replacing the previous synthetic files) if it records different ones. Generation happens
    in a temporary sibling directory that is moved into place only when complete, under an inter-process
    lock, so concurrent callers (e.g. several DDP ranks) generate once and never see a half-written dataset
    marked complete. ``num_workers``: processes to use (default: available CPUs; 0 or 1: in-process).
    """
    given = pathlib.Path(root).expanduser()
    root = given.absolute()
    if seed < 0 or num_train < 0 or num_val < 0:
        raise ValueError("seed, num_train and num_val must be non-negative")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    params = _params(seed, num_train, num_val, image_size)
    workers = _default_workers() if num_workers is None else int(num_workers)
    t0 = time.perf_counter()

    def build(tmp: pathlib.Path) -> None:
        log.info(
            "Generating synthetic few-shot benchmark (%d train + %d val, %d px, %d workers) in %s",
            num_train,
            num_val,
            image_size,
            max(workers, 1),
            root,
        )
        _build(tmp, params, workers)

    if build_once(root, params, build, what="a synthetic benchmark"):
        log.info("Synthetic benchmark ready in %.1fs", time.perf_counter() - t0)
    return given
