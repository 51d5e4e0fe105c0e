"""Segment your own images from a few annotated examples.

    python -m fewshotseg.predict ckpt=logs/train/runs/<run>/checkpoints/best-epoch009.ckpt \\
        support=[cat1.jpg,cat2.jpg] support_mask=[cat1.png,cat2.png] query=photos/ out=predictions/
    python -m fewshotseg.predict method=asgnet data=pascal fold=0 shot=1 weights=<the authors' file> \\
        support=[a.jpg] support_mask=[a.png] query=b.jpg class_name=cat

A support mask is a PNG of the support image's size: 0 background, 1 or 255 the object. `query` is
an image or a folder of images. Each image goes through the method's test transform (the code path
of evaluation); the logits are brought back to the query's original size as original-resolution
scoring does (bilinear, align_corners=True, in the test transform's frame), and `out` receives
`<query>_mask.png` (0 background, 255 object) and `<query>_overlay.png` per query. With a frozen
backbone the supports' backbone maps are computed once for all queries (`feature_reuse`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from fewshotseg.cli import hydra_main, user_errors
from fewshotseg.data.episode import collate_episodes
from fewshotseg.data.sources.base import read_image
from fewshotseg.data.transforms import PairTransform
from fewshotseg.errors import ConfigError, DataError
from fewshotseg.methods.base import Method, method_class
from fewshotseg.overlays import outline
from fewshotseg.runs import load_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_support_mask(path: str | Path, image_shape: tuple[int, int], image_path: str | Path) -> np.ndarray:
    """A user's binary mask as {0, 1}: 0 background, 1 or 255 (>= 128 for grey masks) the object."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            raw = np.asarray(im if im.mode in ("P", "L", "I", "I;16", "1") else im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"support_mask {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"support_mask {path}: cannot read it as an image ({e})") from e
    if raw.shape != tuple(image_shape):
        raise DataError(
            f"support_mask {path} is {raw.shape[0]}x{raw.shape[1]} but its image {image_path} is "
            f"{image_shape[0]}x{image_shape[1]}: expected a mask of the image's size"
        )
    values = np.unique(raw)
    if set(values.tolist()) <= {0, 1}:
        mask = raw == 1
    elif values.max() >= 128:
        mask = raw >= 128
    else:
        raise DataError(
            f"support_mask {path} has values {values[:10].tolist()}: expected 0 background and 1 or 255 object"
        )
    if not mask.any():
        raise DataError(f"support_mask {path} is empty: expected the object marked with 1 or 255")
    return mask.astype(np.uint8)


def query_paths(query: str | Path) -> list[Path]:
    """An image, or the images of a folder (sorted)."""
    path = Path(query)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"query={path}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return found
    if not path.is_file():
        raise DataError(f"query={path}: no such image or folder")
    return [path]


def _as_list(value, key: str) -> list[str]:
    if value is None:
        raise ConfigError(f"{key}= is required: e.g. {key}=[a.jpg,b.jpg]")
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not items:
        raise ConfigError(f"{key}=[]: expected at least one file")
    return [str(v) for v in items]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def class_id_of(class_name: str | None, class_names: list[str], method: Method) -> int:
    """The dataset's class id (1..N) of `class_name`; 0 when none is given (methods that read the
    class's name, `reads_class_names` in their contract, need one)."""
    if class_name is None:
        if method.reads_class_names:
            raise ConfigError(
                f"class_name= is required: {type(method).__name__} uses the class of the objects; one of "
                f"{class_names[:20]}{' ...' if len(class_names) > 20 else ''}"
            )
        return 0
    matches = [i + 1 for i, name in enumerate(class_names) if _norm(name) == _norm(str(class_name))]
    if not matches:
        raise ConfigError(
            f"class_name={class_name}: not a class of this dataset; expected one of "
            f"{class_names[:20]}{' ...' if len(class_names) > 20 else ''}"
        )
    return matches[0]


def episode_item(
    transform: PairTransform, image: np.ndarray, mask: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    transform.set_seed(0)  # test transforms are deterministic; a random op added later stays so
    out = transform(image, mask)
    return out[0], out[1]


def to_original_size(logits: torch.Tensor, transform: PairTransform, size: tuple[int, int]) -> torch.Tensor:
    """[2,h,w] logits -> the [H,W] mask at the image's original size, as original-resolution
    scoring computes it (lit.py): bilinear (align_corners=True) to the transform's original frame
    (the image size; for the PFENet resize the max(H, W) square), argmax, then the image's part."""
    frame = transform.original_frame(np.zeros(size, np.uint8)).shape
    up = F.interpolate(logits[None], size=frame, mode="bilinear", align_corners=True)
    return up.argmax(1)[0, : size[0], : size[1]]


def predict(cfg: DictConfig) -> list[Path]:
    supports = _as_list(cfg.get("support"), "support")
    masks = _as_list(cfg.get("support_mask"), "support_mask")
    if len(supports) != len(masks):
        raise ConfigError(f"support= has {len(supports)} images but support_mask= has {len(masks)} masks")
    queries = query_paths(cfg.get("query") or "")
    out = Path(cfg.get("out") or cfg.paths.output_dir)
    s_raw = []  # every input is checked before the model is built
    for image_path, mask_path in zip(supports, masks):
        image = read_image(Path(image_path))
        s_raw.append((image, read_support_mask(mask_path, image.shape[:2], image_path)))

    run_cfg, datamodule, module = load_model(cfg)
    if method_class(run_cfg).task != "episodes":
        raise ConfigError(
            f"{run_cfg.method.model._target_} is a stage (semantic segmentation of the base classes), "
            "not a few-shot method: it takes no supports"
        )
    transform = datamodule.test_transform
    class_id = class_id_of(cfg.get("class_name"), datamodule.class_names, module.method)
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device).eval()
    module.set_feature_reuse(cfg.get("feature_reuse"))
    module.begin_reuse(transform)  # the supports' backbone maps, computed once for every query
    s_items = [episode_item(transform, image, mask) for image, mask in s_raw]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(queries, desc="predict", unit="image"):
        image = read_image(path)
        q_img, _ = episode_item(transform, image, np.zeros(image.shape[:2], np.uint8))
        batch = collate_episodes([{
            "query_img": q_img,
            "support_imgs": torch.stack([s[0] for s in s_items]),
            "support_masks": torch.stack([s[1] for s in s_items]),
            "class_id": class_id,
            "episode_idx": -1,
            "query_id": path.stem,
            "support_ids": [Path(s).stem for s in supports],
        }])  # fmt: skip
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            logits = module(batch)[0].float()
        mask = to_original_size(logits, transform, image.shape[:2]).cpu().numpy().astype(np.uint8)
        Image.fromarray(mask * 255).save(out / f"{path.stem}_mask.png")
        Image.fromarray(outline(image, mask, width=max(2, min(image.shape[:2]) // 150))).save(
            out / f"{path.stem}_overlay.png"
        )
        written.append(out / f"{path.stem}_mask.png")
    print(module.feature_reuse_summary())
    print(f"{len(written)} masks and overlays written to {out}")
    return written


@hydra_main("predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
