"""Image + mask pipelines (albumentations 2.x), applied to every image of an episode separately.

- train_transform: the PFENet family's augmentation (ASGNet `util/transform.py`), written with the
  same cv2 calls in float32 rather than with albumentations, whose ops differ in the details that
  move numbers (blur sigma, rounding of the scaled size, rotation centre, uint8 between ops): random
  scale, rotate +-10 deg (p=0.5, padded with the mean pixel / 255), 5x5 Gaussian blur (p=0.5),
  horizontal flip (p=0.5), then a random crop padded with the mean pixel / 255 and re-drawn (up to
  1 + 31 draws) until it keeps 85 % of the object's pixels.
- pad_transform: the PFENet family's test resize: the longer side to `size`, both sides floored to a
  multiple of 8, at the top-left of a size x size canvas of raw pixel value 0 (label 255).
- resize_transform: squash-resize to size x size (HSNet for training and test, PANet).

Every transform takes an optional `extra` label (HxW uint8, e.g. the query's base-class label of
BAM-style methods) that goes through the same geometry as the mask (nearest, 255 fill) and comes
back as a third tensor; the crop/redraw rules look at the mask only.

A transform also says in which frame original-resolution scoring compares (`original_frame`): the
raw label for a squash resize; the raw label padded with 255 to a square of side max(H, W) for the
PFENet resize, whose logits are upsampled to that square (docs/protocols.md).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_PIXEL = tuple(255 * m for m in IMAGENET_MEAN)
_STD_PIXEL = tuple(255 * s for s in IMAGENET_STD)
IGNORE = 255


def _to_tensors(image: np.ndarray, *labels: np.ndarray) -> tuple[torch.Tensor, ...]:
    """[3,H,W] float and each label as [H,W] long."""
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    return img, *(torch.from_numpy(np.ascontiguousarray(label)).long() for label in labels)


def _labels(mask: np.ndarray, extra: np.ndarray | None) -> list[np.ndarray]:
    """The mask, and the extra label if any. They go through albumentations as `masks=[...]`, which
    moves each exactly as a lone mask (an HxWx2 stack would rotate a few pixels differently)."""
    if extra is None:
        return [mask]
    if extra.shape != mask.shape:
        raise ValueError(f"extra label {extra.shape} must have the mask's shape {mask.shape}")
    return [mask, extra]


class PairTransform:
    """Wraps an albumentations pipeline: (HxWx3 uint8, HxW uint8 mask) -> ([3,H,W] float, [H,W] long)."""

    description = "custom transform"  # how it resizes, as results.json records it (test_input)

    def __init__(self, ops: list, keep_foreground_tries: int = 1):
        self.pipeline = A.Compose([*ops, A.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        # Random ops can remove the whole object; redraw up to this many times.
        self.keep_foreground_tries = keep_foreground_tries

    def set_seed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)

    def original_frame(self, label: np.ndarray) -> np.ndarray:
        """The raw label as original-resolution scoring sees it (see the module docstring)."""
        return label

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, extra: np.ndarray | None = None
    ) -> tuple[torch.Tensor, ...]:
        had_foreground = bool((mask == 1).any())
        for _ in range(self.keep_foreground_tries):
            out = self.pipeline(image=image, masks=_labels(mask, extra))
            if not had_foreground or (out["masks"][0] == 1).any():
                break
        return _to_tensors(out["image"], *out["masks"])


def rand_scale(rng: np.random.Generator, image: np.ndarray, labels: list[np.ndarray],
               scale: tuple[float, float]) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """RandScale: one factor s ~ U(scale) for both sides, cv2.resize with fx = fy = s (cv2 rounds
    the new size and maps pixels with s itself, not with new size / old size)."""
    s = scale[0] + (scale[1] - scale[0]) * rng.random()
    image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    return image, [cv2.resize(m, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST) for m in labels]


def rotate(image: np.ndarray, labels: list[np.ndarray], angle: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rotation by `angle` degrees about (w / 2, h / 2), the image padded with the mean pixel and
    the labels with 255 (PFENet's RandRotate once it has decided to rotate)."""
    h, w = labels[0].shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=_MEAN_PIXEL)  # fmt: skip
    return image, [
        cv2.warpAffine(
            m, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE
        )  # fmt: skip
        for m in labels
    ]


def gaussian_blur(image: np.ndarray) -> np.ndarray:
    """cv2's 5x5 kernel with sigma 0, i.e. cv2's fixed [1, 4, 6, 4, 1] / 16 in each direction."""
    return cv2.GaussianBlur(image, (5, 5), 0)


def pad_to(image: np.ndarray, labels: list[np.ndarray], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pad to at least size x size, centred (the extra pixel bottom/right), mean pixel / 255."""
    h, w = labels[0].shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if not (ph or pw):
        return image, labels
    border = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=_MEAN_PIXEL)
    return image, [cv2.copyMakeBorder(m, *border, cv2.BORDER_CONSTANT, value=IGNORE) for m in labels]


def crop_offset(rng: np.random.Generator, mask: np.ndarray, size: int, keep_ratio: float, redraws: int) -> tuple[int, int]:  # fmt: skip
    """A random size x size window; while it keeps less than keep_ratio of the object (label 1),
    drawn again, at most `redraws` more times (PFENet's Crop: 1 + 31 draws)."""
    (h, w), total = mask.shape, int((mask == 1).sum())
    for _ in range(1 + max(0, redraws)):
        y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        if (mask[y : y + size, x : x + size] == 1).sum() >= keep_ratio * total:
            break
    return y, x


class AugmentTransform(PairTransform):
    """The PFENet family's training augmentation, op for op as the authors' `util/transform.py`:
    RandScale, RandRotate (p 0.5), 5x5 Gaussian blur (p 0.5), horizontal flip (p 0.5), crop, then
    the ImageNet normalisation, all on a float32 image (no rounding to uint8 between ops). The
    random numbers come from numpy (seeded by set_seed), not from Python's `random`."""

    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.9, 1.1), rotate: float = 10.0,
                 blur_p: float = 0.5, flip_p: float = 0.5, crop_redraws: int = 31, keep_ratio: float = 0.85):  # fmt: skip
        self.crop_size, self.scale, self.max_angle = crop_size, tuple(scale), rotate
        self.rotate_p = 0.5 if rotate else 0.0
        self.blur_p, self.flip_p, self.crop_redraws, self.keep_ratio = (
            blur_p,
            flip_p,
            crop_redraws,
            keep_ratio,
        )
        self._rng = np.random.default_rng(0)
        self.description = f"training augmentation, crop {crop_size} x {crop_size}"

    def set_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, extra: np.ndarray | None = None
    ) -> tuple[torch.Tensor, ...]:
        rng, labels = self._rng, _labels(mask, extra)
        image, labels = rand_scale(rng, np.float32(image), labels, self.scale)
        if rng.random() < self.rotate_p:
            image, labels = rotate(image, labels, self.max_angle * (2 * rng.random() - 1))
        if rng.random() < self.blur_p:
            image = gaussian_blur(image)
        if rng.random() < self.flip_p:
            image, labels = cv2.flip(image, 1), [cv2.flip(m, 1) for m in labels]
        image, labels = pad_to(image, labels, self.crop_size)
        cs = self.crop_size
        y, x = crop_offset(rng, labels[0], cs, self.keep_ratio, self.crop_redraws)
        image = (image[y : y + cs, x : x + cs] - np.float32(_MEAN_PIXEL)) / np.float32(_STD_PIXEL)
        return _to_tensors(image, *(m[y : y + cs, x : x + cs] for m in labels))


def train_transform(
    crop_size: int,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate: float = 10.0,
    blur_p: float = 0.5,
    flip_p: float = 0.5,
    crop_redraws: int = 31,
) -> PairTransform:
    """The PFENet family's augmentation; scale [0.9, 1.1] on PASCAL, [0.8, 1.25] on COCO."""
    return AugmentTransform(crop_size, scale, rotate, blur_p, flip_p, crop_redraws)


def resize_transform(size: int, flip_p: float = 0.0) -> PairTransform:
    """Squash-resize to size x size (HSNet, PANet); with flip_p > 0 it is PANet's training pipeline."""
    ops = [A.Resize(size, size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
    if flip_p:
        ops.append(A.HorizontalFlip(p=flip_p))
    transform = PairTransform(ops)
    transform.description = f"squash-resize to {size} x {size}"
    return transform


def pfenet_resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """PFENet's `Resize.find_new_hw`: the longer side to `size`, then both sides floored to a multiple
    of 8 (so 473 becomes 472)."""
    nh, nw = (size, int(w * size / h)) if h >= w else (int(h * size / w), size)
    return max(1, nh - nh % 8 or nh), max(1, nw - nw % 8 or nw)


class PadTransform(PairTransform):
    """PFENet's test resize (aspect kept, top-left on a size x size canvas; image 0, label 255)."""

    def __init__(self, size: int):
        super().__init__([])
        self.size = size
        self.description = f"longer side to {size} (aspect kept), padded to {size} x {size}"

    def set_seed(self, seed: int) -> None:  # deterministic
        pass

    def original_frame(self, label: np.ndarray) -> np.ndarray:
        side = max(label.shape)
        out = np.full((side, side), IGNORE, np.uint8)
        out[: label.shape[0], : label.shape[1]] = label
        return out

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, extra: np.ndarray | None = None
    ) -> tuple[torch.Tensor, ...]:
        nh, nw = pfenet_resized_shape(*mask.shape, self.size)
        canvas = np.zeros((self.size, self.size, 3), np.float32)  # raw 0: normalised black, as PFENet
        canvas[:nh, :nw] = cv2.resize(image.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
        labels = []
        for m in _labels(mask, extra):
            label = np.full((self.size, self.size), IGNORE, np.uint8)
            label[:nh, :nw] = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
            labels.append(label)
        canvas = (canvas - np.float32(_MEAN_PIXEL)) / np.float32(_STD_PIXEL)
        return _to_tensors(canvas, *labels)


def pad_transform(size: int) -> PairTransform:
    return PadTransform(size)


def protocol_transforms(train: str, test: str, size: int, scale: tuple[float, float] | None = None,
                        rotate: float = 10.0) -> tuple[PairTransform, PairTransform]:  # fmt: skip
    """The (train, test) transforms a protocol names: train augment|resize|resize_flip, test pad|resize."""
    if train == "augment":
        train_t = train_transform(size, tuple(scale or (0.9, 1.1)), rotate)
    elif train in ("resize", "resize_flip"):
        train_t = resize_transform(size, flip_p=0.5 if train == "resize_flip" else 0.0)
    else:
        raise ValueError(f"train={train!r}: expected 'augment', 'resize' or 'resize_flip'")
    if test == "pad":
        test_t = pad_transform(size)
    elif test == "resize":
        test_t = resize_transform(size)
    else:
        raise ValueError(f"test={test!r}: expected 'pad' or 'resize'")
    return train_t, test_t
