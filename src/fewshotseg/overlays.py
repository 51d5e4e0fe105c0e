"""Pictures of episodes that a person can read: masks as outlines and TP/FP/FN colours that stay
visible on any object colour, each tile titled, the class and the episode IoU named.

- `outline(rgb, mask)`: the object's contour, a white line inside and a black line outside, so it
  shows on dark, bright and saturated objects alike; ignored pixels (255) hatched grey.
- `error_map(rgb, pred, truth)`: the image in grey (so no object colour competes with the codes),
  true positives green, false positives magenta, misses blue; ignored pixels hatched.
- `episode_row(...)`: supports | query | prediction | truth, titled, under a line naming the class
  and the episode IoU. `legend(width)`: what the colours mean. Used by callbacks.QualitativeOverlays
  and predict (`<query>_overlay.png`: `outline` of the predicted mask).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TP = (40, 200, 40)  # predicted and true: green
FP = (255, 40, 255)  # predicted, not the object: magenta
FN = (30, 130, 255)  # the object, missed: blue
HATCH = (128, 128, 128)
IGNORE = 255
MIN_TILE = 160  # tiles are enlarged (nearest) to at least this many pixels, so titles fit
_TITLE_H, _FONT_SIZE = 18, 13


def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def enlarge(a: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an image [H,W,3] or a mask [H,W] by an integer factor."""
    return a if factor == 1 else np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)


def _shift_any(m: np.ndarray, r: int) -> np.ndarray:
    """Pixels within `r` (square) of a True pixel of `m`."""
    out = m.copy()
    padded = np.pad(m, r)
    h, w = m.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _hatch(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(mask.shape)
    stripes = (mask == IGNORE) & ((ys + xs) % 6 < 2)
    rgb[stripes] = HATCH
    return rgb


def outline(rgb: np.ndarray, mask: np.ndarray, width: int = 2) -> np.ndarray:
    """`rgb` with the contour of `mask == 1`: `width` px white inside, `width` px black outside."""
    obj = np.asarray(mask) == 1
    out = _hatch(np.array(rgb, dtype=np.uint8), np.asarray(mask))
    inside = obj & _shift_any(~obj, width)
    outside = ~obj & _shift_any(obj, width)
    out[inside] = 255
    out[outside] = 0
    return out


def error_map(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray, opacity: float = 0.7) -> np.ndarray:
    """The image in grey with true positives, false positives and misses in their colours."""
    grey = np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.repeat(
        (0.35 + 0.5 * grey / 255)[..., None] * 255, 3, axis=2
    )  # lighter grey: the codes stand out
    pred, truth = np.asarray(pred) == 1, np.asarray(truth)
    valid = truth != IGNORE
    for where, colour in (
        (pred & (truth == 1), TP),
        (pred & (truth == 0), FP),
        (~pred & (truth == 1) & valid, FN),
    ):
        out[where] = (1 - opacity) * out[where] + opacity * np.array(colour, dtype=np.float32)
    return _hatch(out.astype(np.uint8), truth)


def episode_iou(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Foreground IoU of one episode (255 ignored); None when neither marks any pixel."""
    pred, truth = np.asarray(pred) == 1, np.asarray(truth)
    valid = truth != IGNORE
    inter = (pred & (truth == 1)).sum()
    union = ((pred & valid) | (truth == 1)).sum()
    return float(inter / union) if union else None


def titled(tile: np.ndarray, title: str) -> np.ndarray:
    """The tile under a white strip holding `title` (cut to the tile's width)."""
    header = Image.new("RGB", (tile.shape[1], _TITLE_H), "white")
    ImageDraw.Draw(header).text((3, 2), title, fill="black", font=_font())
    return np.concatenate([np.asarray(header), tile], axis=0)


def _text_strip(text: str, width: int, height: int = 22, size: int = 14) -> np.ndarray:
    strip = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(strip).text((4, 3), text, fill="black", font=_font(size))
    return np.asarray(strip)


def episode_row(supports: list[np.ndarray], support_masks: list[np.ndarray], query: np.ndarray,
                pred: np.ndarray, truth: np.ndarray | None, heading: str) -> np.ndarray:  # fmt: skip
    """supports (mask outlined) | query | prediction (TP/FP/FN, or outlined without truth) | truth,
    titled, under `heading` followed by the episode IoU."""
    factor = max(1, -(-MIN_TILE // query.shape[0]))  # ceil
    big = lambda a: enlarge(np.asarray(a), factor)  # noqa: E731
    tiles = [
        titled(outline(big(s), big(m)), f"support {k + 1}")
        for k, (s, m) in enumerate(zip(supports, support_masks))
    ]
    tiles.append(titled(big(query), "query"))
    if truth is None:
        tiles.append(titled(outline(big(query), big(pred)), "prediction"))
    else:
        iou = episode_iou(pred, truth)
        heading += (
            f"  ·  episode IoU {100 * iou:.1f}" if iou is not None else "  ·  episode IoU n/a (no object)"
        )
        tiles.append(titled(error_map(big(query), big(pred), big(truth)), "prediction vs truth"))
        tiles.append(titled(outline(big(query), big(truth)), "truth"))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    return np.concatenate([_text_strip(heading, row.shape[1]), row], axis=0)


def legend(width: int) -> np.ndarray:
    """A strip saying what the outline, the colours and the hatching mean."""
    strip = Image.new("RGB", (width, 24), "white")
    draw, font, x = ImageDraw.Draw(strip), _font(), 4
    items = [((255, 255, 255), "outline: mask (white in, black out)"), (TP, "true positive"),
             (FP, "false positive"), (FN, "missed"), (HATCH, "ignored (255)")]  # fmt: skip
    for colour, text in items:
        draw.rectangle([x, 6, x + 12, 18], fill=colour, outline="black")
        draw.text((x + 16, 5), text, fill="black", font=font)
        x += 22 + int(draw.textlength(text, font=font)) + 10
    return np.asarray(strip)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows (padded to the widest) one under another, with the legend at the bottom."""
    width = max(max(r.shape[1] for r in rows), 620)
    padded = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate([*padded, legend(width)], axis=0)
