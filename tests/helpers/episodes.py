"""One synthetic few-shot episode builder for the method tests.

Every episode is drawn the same way: the support masks are painted first (random boxes drawn from
the episode's generator, or fixed regions), then the query image and the support images are drawn
from that generator, then (optionally) the query's base-class label. The presets the method tests
use are spelled out at their call sites; the defaults are the random-box episode of the PFENet-family
tests (65 px, 9 x 9 features at output stride 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIZE = 65  # (65 - 1) % 8 == 0 -> 9 x 9 features at output stride 8

# A region of a mask: the index of its last two (H, W) dimensions, e.g. `(slice(8, 20), slice(8, 20))`.
Region = tuple[slice, ...]
Paint = Sequence[tuple[Region, int]]

# The random-box episode's fixed parts: the last two columns of the support masks are ignored (255)
# and the query foreground is one box.
RANDOM_BOX_IGNORE: Paint = (((slice(None), slice(-2, None)), 255),)
RANDOM_BOX_QUERY: Region = (slice(10, 50), slice(15, 45))


def _paint(mask: torch.Tensor, paint: Paint) -> None:
    for region, value in paint:
        mask[(Ellipsis, *region)] = value


def episode(
    B: int = 2,
    K: int = 1,
    size: int = SIZE,
    seed: int = 0,
    *,
    random_boxes: bool = True,
    support: Paint = RANDOM_BOX_IGNORE,
    query: Region = RANDOM_BOX_QUERY,
    dtype: torch.dtype | None = None,
    base_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of B episodes with K shots of `size` x `size` images, drawn from `seed`.

    random_boxes: each support mask gets a foreground box at a random corner in [0, 20) and a random
        size in [20, 45) (drawn per episode and shot, before the images).
    support: then these (region, value) pairs are painted onto every support mask, in order.
    query: the query mask's foreground (1) region.
    dtype: of the images (None: torch's default).
    base_classes: if set, a random `query_base_label` in [0, base_classes] is drawn after the images.
    """
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, K, size, size, dtype=torch.long)
    if random_boxes:
        for b in range(B):
            for k in range(K):
                r, c = torch.randint(0, 20, (2,), generator=g).tolist()
                h, w = torch.randint(20, 45, (2,), generator=g).tolist()
                masks[b, k, r : r + h, c : c + w] = 1
    _paint(masks, support)
    q_mask = torch.zeros(B, size, size, dtype=torch.long)
    q_mask[(slice(None), *query)] = 1
    out = {
        "query_img": torch.randn(B, 3, size, size, generator=g, dtype=dtype),
        "support_imgs": torch.randn(B, K, 3, size, size, generator=g, dtype=dtype),
        "support_masks": masks,
        "query_mask": q_mask,
    }
    if base_classes is not None:
        out["query_base_label"] = torch.randint(0, base_classes + 1, (B, size, size), generator=g)
    return out
