"""Superpixel-guided clustering (SGC) and guided prototype allocation (GPA) of ASGNet.

Parameter-free operations of ASGNet (Li et al., CVPR 2021; official code
github.com/Reagan1311/ASGNet at cd898c5, ``util/seed_init.py`` and ``model/asgnet.py``).
This is an independent re-implementation, written from the paper and a reading of that code; it
reproduces the official results up to float rounding except in the places
listed below.

Pipeline
--------
1. :func:`place_seeds` (dataset side, CPU, numpy/scipy): choose up to ``max_num`` seed cells
   on the stride-8 feature grid from the support mask at input resolution. An empty result
   means "fewer than two superpixels: fall back to masked average pooling".
2. :func:`seeds_to_padded`: batch variable-length seed sets as a zero-padded ``[N, S, 2]``
   tensor plus an explicit count ``[N]``; :func:`place_seeds_batch` does 1 and 2 for a batch
   of masks (downsampling on their device).
3. :func:`superpixel_clustering` (one support image) or
   :func:`batched_superpixel_clustering` (whole batch, all shots, no Python loop over
   elements): iterate the soft superpixel centres and return the prototypes.
4. :func:`guided_prototype_allocation`: per query pixel, cosine similarity to every valid
   prototype; the probability map is the *sum* of those similarities and the guide feature is
   the prototype with the largest similarity.

Deviations from the official code (all intentional) and faithfulness notes
--------------------------------------------------------------------------
* **Seed count is explicit.** The official model recovers the number of seeds from the
  zero-padded seed tensor as ``max(#nonzero rows, #nonzero cols)``, so a real seed at grid
  cell (0, 0) is not counted. Here :func:`place_seeds` returns exactly the seeds and
  :func:`seeds_to_padded` returns the count alongside the padded tensor.
* **Non-square masks.** The official code calls ``cv2.resize(mask, dsize=(down_h, down_w))``,
  but cv2's ``dsize`` is (width, height), so a non-square mask is resized to a transposed
  grid shape. Rows and columns are handled separately here (``down_h`` rows, ``down_w``
  columns). Square inputs (the only ones used by the official train/test code) are unaffected.
* **Nearest downsampling rule (faithful).** Reproduced from cv2 ``INTER_NEAREST`` bit for bit:
  ``src = min(floor(dst * (1.0 / (out / in))), in - 1)`` evaluated in float64. This equals
  ``floor(dst * in / out)`` except where ``dst * in / out`` is an exact integer and the
  float64 reciprocal rounds below it (e.g. H = 172: cv2 takes row 85 for cell 11, not 86).
  For 473 -> 60 and 641 -> 81 both rules agree. No OpenCV dependency is needed.
* **Numerically stable normalisation.** The official SGC computes ``exp(-D)`` and divides by
  its sum over pixels; in float32 ``exp(-D)`` underflows for D > ~87-104, and if a centre is
  that far from every ROI pixel the result is 0/0 = NaN. Here the normalisation is a softmax
  over the ROI pixels of ``-D`` (log-sum-exp), which is mathematically identical and equal to
  the official result wherever that is finite, and never NaN.
* **Empty ROI (faithful).** If the support mask has no pixel exactly equal to 1 (the
  official ROI rule), the official code sums over zero pixels and returns all-zero centres
  (finite, not NaN); this is reproduced: the prototypes are zero vectors, like the
  masked-average-pooling prototype of an empty mask. With 473/641 inputs this needs a
  pathological mask: bilinear ``align_corners=True`` downsampling 473 -> 60 (641 -> 81)
  samples input pixel ``8 * cell`` exactly, so the clustering mask is binary (not soft) and
  differs from the seed grid (input pixel ``floor(cell * 473 / 60)``) only at boundaries; a
  seed can therefore lie just outside the ROI.
* **``n_iter >= 1`` is required** (the official code would return all-zero centres for
  ``n_iter == 0``, a case it never uses; it runs 10 iterations in training, 5 in evaluation).
* **Precision.** Half / bfloat16 inputs are clustered in float32 and the result is cast back.
* **GPA with one prototype.** The official code has a separate branch for ``shot == 1`` with a
  single (MAP) prototype; it produces exactly what the general rule gives for N = 1 (the sum of
  one similarity is that similarity, the argmax is that prototype), so one code path is used.

All clustering functions run under ``torch.no_grad()`` like the official code (the prototypes
carry no gradient; ``down_conv`` is trained only through the query branch).
:func:`guided_prototype_allocation` keeps the autograd graph, so the probability map is
differentiable w.r.t. the query feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, gaussian_filter

__all__ = [
    "SPATIAL_DIVISOR",
    "MAP_EPS",
    "COS_EPS",
    "place_seeds",
    "place_seeds_batch",
    "seed_grid_shape",
    "seeds_to_padded",
    "superpixel_clustering",
    "batched_superpixel_clustering",
    "guided_prototype_allocation",
]

#: The squared spatial distance (in grid cells) is divided by this before it is added to the
#: squared feature distance (official ``spat_dist / 100``).
SPATIAL_DIVISOR = 100.0
#: Denominator epsilon of the masked-average-pooling fallback (official ``Weighted_GAP``).
MAP_EPS = 5e-4
#: ``eps`` of the cosine similarity in GPA (official ``F.cosine_similarity(..., eps=1e-7)``).
COS_EPS = 1e-7
#: Standard deviation of the (identity) Gaussian smoothing of the distance transform.
_SEED_SMOOTH_SIGMA = 0.1


# --------------------------------------------------------------------------------------------
# Seeds (dataset side)
# --------------------------------------------------------------------------------------------


def _nearest_src_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of cv2 ``INTER_NEAREST`` resizing ``n_in`` -> ``n_out`` along one axis.

    cv2 computes ``floor(dst * ifx)`` with ``ifx = 1.0 / (n_out / n_in)`` in double precision
    and clips to ``n_in - 1``; reproduced here exactly (see the module docstring).
    """
    ifx = 1.0 / (n_out / n_in)
    idx = np.floor(np.arange(n_out, dtype=np.float64) * ifx).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _as_numpy_2d(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask


def place_seeds(mask, max_num: int = 5, avg_area: float = 100, stride: int = 8) -> np.ndarray:
    """Initial superpixel seeds on the stride grid (official ``place_seed_points``).

    Args:
        mask: support label at input resolution, ``(H, W)`` numpy array or torch tensor (a
            leading singleton dimension is accepted). Foreground is ``mask == 1``; every other
            value, including the ignore label 255, is not foreground.
        max_num: maximum number of superpixels (config ``max_sp``, 5).
        avg_area: average superpixel area in grid cells (``avg_sp_area``, 100).
        stride: output stride of the feature map (8).

    Returns:
        ``(n, 2)`` int64 array of ``(row, col)`` cells on the ``int((H-1)/stride+1)`` x
        ``int((W-1)/stride+1)`` grid, in placement order. ``n == 0`` means that the method
        falls back to masked average pooling (fewer than two superpixels); otherwise
        ``2 <= n <= max_num``. The seeds are distinct foreground cells of the downsampled mask.

    Rule (official): the foreground is downsampled with cv2-style nearest sampling; ``A`` =
    number of foreground cells; ``n = min(np.round(A / avg_area), max_num)`` (round half to
    even: with the defaults A <= 50 -> 0, 51-149 -> 1, 150-250 -> 2, 251-349 -> 3,
    350-450 -> 4, >= 451 -> 5); if ``n`` is 0 or 1 there are no seeds. Otherwise the grid is
    cropped to the bounding box of the foreground cells and, ``n`` times, the cell with the
    largest Euclidean distance transform value (first in row-major order; after a Gaussian
    smoothing with sigma 0.1, which is an exact identity because its kernel radius is
    ``int(4 * 0.1 + 0.5) = 0``) becomes a seed and is set to background. The crop border is
    *not* background for the distance transform. If the cropped box is entirely foreground
    (a filled rectangle: no background cell at all), ``scipy.ndimage.distance_transform_edt``
    has no zero to measure from; scipy 1.17 then returns distances to a virtual point just
    above the first row, so the first seed is the bottom-right corner of the box and the
    second the top-left corner. The same scipy call is made as in the official code, so this
    quirk matches it under the same scipy version.

    Non-square masks are resized with ``H``-derived rows and ``W``-derived columns (the
    official code swaps ``dsize`` for non-square inputs; see the module docstring).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    fg = _as_numpy_2d(mask) == 1
    rows, cols = _grid_indices(*fg.shape, stride)
    return _seeds_on_grid(fg[np.ix_(rows, cols)], max_num, avg_area)


def seed_grid_shape(height: int, width: int, stride: int = 8) -> tuple[int, int]:
    """The seed grid of a ``height x width`` mask: ``int((H - 1) / stride + 1)`` rows (and
    columns likewise), which is the feature size of a stride-``stride`` ResNet (60 for 473)."""
    return int((height - 1) / stride + 1), int((width - 1) / stride + 1)


def _grid_indices(height: int, width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Input rows and columns sampled by the nearest downsampling to the stride grid."""
    grid_h, grid_w = seed_grid_shape(height, width, stride)
    return _nearest_src_index(height, grid_h), _nearest_src_index(width, grid_w)


def _seeds_on_grid(grid: np.ndarray, max_num: int, avg_area: float) -> np.ndarray:
    """The seed rule of :func:`place_seeds` on an already downsampled boolean foreground grid."""
    empty = np.zeros((0, 2), dtype=np.int64)
    rows, cols = np.nonzero(grid)
    if rows.size == 0:
        return empty
    r0, r1 = int(rows.min()), int(rows.max())
    c0, c1 = int(cols.min()), int(cols.max())
    roi = grid[r0 : r1 + 1, c0 : c1 + 1].astype(np.float64)

    area = int(rows.size)
    num = int(min(np.round(np.float64(area) / avg_area), max_num))
    if num < 2:
        return empty

    seeds = np.empty((num, 2), dtype=np.int64)
    roi_w = roi.shape[1]
    for k in range(num):
        dist = gaussian_filter(distance_transform_edt(roi), sigma=_SEED_SMOOTH_SIGMA)
        r, c = divmod(int(np.argmax(dist)), roi_w)  # first maximum in row-major order
        seeds[k] = (r + r0, c + c0)
        roi[r, c] = 0.0
    return seeds


def place_seeds_batch(
    masks: torch.Tensor,
    max_num: int = 5,
    avg_area: float = 100,
    stride: int = 8,
    grid_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`place_seeds` for a batch of masks, as padded tensors on the masks' device.

    Args:
        masks: ``[N, H, W]`` support labels at input resolution (any device; foreground is
            ``== 1``).
        max_num, avg_area, stride: as in :func:`place_seeds`.
        grid_size: the feature grid ``(h, w)`` to place seeds on, when it is not the stride rule's
            ``int((H-1)/stride+1)`` (backbones at native strides, ViT patch grids); the same
            nearest sampling maps it onto the mask.

    Returns:
        ``(seeds, counts)`` as :func:`seeds_to_padded` gives them (``[N, max_num, 2]`` and
        ``[N]``, long, on ``masks.device``); ``seeds[i, :counts[i]] == place_seeds(masks[i])``.

    The nearest downsampling runs on the masks' device, so only the small ``[N, h, w]`` grid
    travels to the CPU (one synchronisation), where the seed rule (scipy distance transforms,
    sequential by nature) runs per mask.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if grid_size is None:
        rows, cols = _grid_indices(masks.shape[1], masks.shape[2], stride)
    else:
        rows, cols = (
            _nearest_src_index(masks.shape[1], grid_size[0]),
            _nearest_src_index(masks.shape[2], grid_size[1]),
        )
    rows_t = torch.from_numpy(rows).to(masks.device)
    cols_t = torch.from_numpy(cols).to(masks.device)
    grid = (masks.index_select(1, rows_t).index_select(2, cols_t) == 1).cpu().numpy()
    seeds, counts = seeds_to_padded([_seeds_on_grid(g, max_num, avg_area) for g in grid], max_num)
    return seeds.to(masks.device), counts.to(masks.device)


def seeds_to_padded(seeds_list: Sequence, max_num: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length seed sets into a zero-padded tensor with explicit counts.

    Args:
        seeds_list: ``N`` seed arrays/tensors, each ``(n_i, 2)`` with ``0 <= n_i <= max_num``
            (e.g. the outputs of :func:`place_seeds` for ``N`` support images).
        max_num: padded length ``S``.

    Returns:
        ``(seeds, counts)``: LongTensor ``[N, max_num, 2]`` (rows ``>= n_i`` are zero) and
        LongTensor ``[N]`` with ``counts[i] = n_i``. Unlike the official zero-padded tensor,
        the count is explicit, so a seed at (0, 0) is not lost.
    """
    out = torch.zeros(len(seeds_list), max_num, 2, dtype=torch.long)
    counts = torch.zeros(len(seeds_list), dtype=torch.long)
    for i, s in enumerate(seeds_list):
        s = torch.as_tensor(np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s))
        s = s.reshape(-1, 2).long()
        if s.shape[0] > max_num:
            raise ValueError(f"element {i} has {s.shape[0]} seeds > max_num={max_num}")
        out[i, : s.shape[0]] = s
        counts[i] = s.shape[0]
    return out, counts


# --------------------------------------------------------------------------------------------
# Superpixel-guided clustering
# --------------------------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"feat must be a floating point tensor, got {dtype}")
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grid_coords(h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[h*w, 2]`` integer (row, col) coordinates of a ``h x w`` grid in row-major order."""
    rr, cc = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)


def _check_seeds_in_range(seeds: torch.Tensor, h: int, w: int, valid: torch.Tensor | None = None):
    if seeds.numel() == 0:
        return
    bad = (seeds[..., 0] < 0) | (seeds[..., 0] >= h) | (seeds[..., 1] < 0) | (seeds[..., 1] >= w)
    if valid is not None:
        bad = bad & valid
    if bool(bad.any()):
        raise ValueError(f"seed coordinates outside the {h}x{w} feature grid")


@torch.no_grad()
def superpixel_clustering(
    feat: torch.Tensor, mask: torch.Tensor, seeds: torch.Tensor, n_iter: int
) -> torch.Tensor:
    """Superpixel-guided clustering of one support feature map (official ``sp_center_iter``).

    Args:
        feat: support feature ``[C, h, w]`` (any float dtype/device).
        mask: support mask ``[h, w]`` (or ``[1, h, w]``) on the feature grid, soft in [0, 1]
            (ASGNet: bilinear, ``align_corners=True``). The ROI is the pixels where
            ``mask == 1`` exactly.
        seeds: ``[n, 2]`` integer ``(row, col)`` seed cells (e.g. from :func:`place_seeds`).
        n_iter: number of iterations (official: 10 in training, 5 in evaluation).

    Returns:
        ``[n, C]`` prototypes (feature part of the final centres), dtype of ``feat``, no grad.

    Each ROI pixel is the vector ``[f_p; row_p; col_p]`` (integer coordinates); the centres
    start at ``[feat[:, r_i, c_i]; r_i; c_i]`` and are updated ``n_iter`` times by
    ``D(p,i) = sqrt(||f_p - c_i||^2 + ||xy_p - xy_i||^2 / 100)``,
    ``Q(:, i) = softmax_p(-D(:, i))`` (= ``exp(-D) / sum_p exp(-D)`` of the official code,
    but finite even when ``exp`` underflows) and ``c_i = sum_p Q(p, i) [f_p; xy_p]``.
    The centres do not interact (the normalisation is over pixels, per centre).
    If the ROI is empty the prototypes are zero vectors (as in the official code).
    Runs under ``torch.no_grad()``, as in the official code.
    """
    if feat.dim() != 3:
        raise ValueError(f"feat must be [C, h, w], got {tuple(feat.shape)}")
    c, h, w = feat.shape
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask must be [{h}, {w}], got {tuple(mask.shape)}")
    wd = _work_dtype(feat.dtype)
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    seeds = torch.as_tensor(seeds, device=feat.device).long().reshape(-1, 2)
    _check_seeds_in_range(seeds, h, w)

    f = feat.to(wd).reshape(c, h * w).t()  # [P, C]
    coords = _grid_coords(h, w, wd, feat.device)  # [P, 2]
    roi = (mask == 1).reshape(-1).to(feat.device)
    f_roi, xy_roi = f[roi], coords[roi]  # [R, C], [R, 2]
    if seeds.shape[0] == 0 or f_roi.shape[0] == 0:  # empty ROI: zero centres (official)
        return feat.new_zeros(seeds.shape[0], c)

    c_feat, c_xy = f[seeds[:, 0] * w + seeds[:, 1]], seeds.to(wd)  # initial centres
    for _ in range(n_iter):
        # direct differences, as the official code ([R, n, C] intermediate)
        feat_d2 = (f_roi[:, None, :] - c_feat[None, :, :]).pow(2).sum(-1)  # [R, n]
        spat_d2 = (xy_roi[:, None, :] - c_xy[None, :, :]).pow(2).sum(-1)
        dist = (feat_d2 + spat_d2 / SPATIAL_DIVISOR).sqrt()
        assoc = torch.softmax(-dist, dim=0)  # normalised over ROI pixels, per centre
        c_feat = assoc.t() @ f_roi  # [n, C]
        c_xy = assoc.t() @ xy_roi  # [n, 2]
    return c_feat.to(feat.dtype)


@torch.no_grad()
def batched_superpixel_clustering(
    feat: torch.Tensor,
    mask: torch.Tensor,
    seeds: torch.Tensor,
    num_seeds: torch.Tensor,
    n_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGC prototypes for a whole batch (all elements, all shots) without a Python loop.

    Args:
        feat: support features ``[B, C, h, w]``. For K shots flatten ``(B, K)`` to ``B*K``
            and reshape the outputs to ``[B, K*S, C]`` / ``[B, K*S]`` (ASGNet concatenates
            the prototypes of all shots).
        mask: support masks ``[B, h, w]`` or ``[B, 1, h, w]``, soft in [0, 1]; clustering ROI
            = ``mask == 1``, MAP fallback weights = ``mask``.
        seeds: padded seeds ``[B, S, 2]`` (from :func:`seeds_to_padded`); rows
            ``>= num_seeds[b]`` are ignored (their content does not matter).
        num_seeds: ``[B]`` number of real seeds per element (``<= S``).
        n_iter: clustering iterations.

    Returns:
        ``(protos, valid)``: ``[B, S, C]`` prototypes (dtype of ``feat``, no grad) and
        ``[B, S]`` bool validity. Elements with ``num_seeds <= 1`` get the masked average
        pooling prototype ``sum(F * M) / (sum(M) + 5e-4)`` in slot 0 (only slot 0 valid; an
        empty mask gives a zero prototype); the others get ``num_seeds`` clustering
        prototypes in slots ``0..num_seeds-1`` (same as :func:`superpixel_clustering`,
        including the zero prototypes of an empty ROI) and invalid zero-filled padding slots.
        Runs under ``torch.no_grad()``.

    Implementation: the ROI pixels of all clustered elements are compacted, in row-major
    order, to the front of a ``[B, R, C]`` buffer (``R`` = largest ROI; padding pixels get
    ``-inf`` logits), so each iteration is one ``cdist`` / softmax / ``bmm`` for the whole
    batch; padded seed slots are clustered too and discarded (the centres never interact).
    The squared feature distance uses exact differences (``torch.cdist`` without the
    ``||f||^2 + ||c||^2 - 2 f.c`` matmul expansion): a centre starts *on* its seed pixel and,
    with the sharp ``exp(-D)`` weighting, often stays close to one pixel, where the expansion
    cancels catastrophically (error ~ ``sqrt(eps * ||f||^2)`` in ``D``); measured on
    spatially smooth random features, the float32 expansion differed from the per-element
    result by up to 5e-2 (features with a common offset of 5; 7.5e-4 even after centring
    them), against < 1e-4 with exact differences. The results match
    :func:`superpixel_clustering` to float32 rounding (``atol = rtol = 1e-5`` in the tests).
    It synchronises with the device a few times (argument checks and ``R``).
    """
    if feat.dim() != 4:
        raise ValueError(f"feat must be [B, C, h, w], got {tuple(feat.shape)}")
    b, c, h, w = feat.shape
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(f"mask must be [{b}, {h}, {w}], got {tuple(mask.shape)}")
    seeds = torch.as_tensor(seeds, device=feat.device).long()
    if seeds.dim() != 3 or seeds.shape[0] != b or seeds.shape[2] != 2:
        raise ValueError(f"seeds must be [{b}, S, 2], got {tuple(seeds.shape)}")
    num_seeds = torch.as_tensor(num_seeds, device=feat.device).long().reshape(b)
    s = seeds.shape[1]
    if s == 0:
        raise ValueError("seeds must have at least one slot (S >= 1) for the MAP fallback")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if bool((num_seeds > s).any()):
        raise ValueError(f"num_seeds exceeds the padded seed length S={s}")
    wd = _work_dtype(feat.dtype)
    p = h * w

    slot_used = torch.arange(s, device=feat.device)[None, :] < num_seeds[:, None]  # [B, S]
    _check_seeds_in_range(seeds, h, w, slot_used)
    clustered = num_seeds >= 2  # [B]

    f = feat.to(wd).reshape(b, c, p)  # [B, C, P]
    m = mask.to(device=feat.device).reshape(b, p)

    # masked average pooling fallback (official Weighted_GAP)
    mw = m.to(wd)
    map_proto = torch.bmm(f, mw[:, :, None])[:, :, 0] / (mw.sum(1, keepdim=True) + MAP_EPS)

    # initial centres; unused slots point at cell (0, 0) (harmless: centres are independent)
    safe = torch.where(slot_used[..., None], seeds, torch.zeros_like(seeds))
    flat_idx = safe[..., 0] * w + safe[..., 1]  # [B, S]
    init_feat = torch.gather(f, 2, flat_idx[:, None, :].expand(b, c, s)).transpose(1, 2)  # [B,S,C]
    c_feat, c_xy = init_feat, safe.to(wd)
    # ROI pixels of the clustered elements, compacted to the front: [B, R] with R = max ROI size
    roi = (m == 1) & clustered[:, None]  # [B, P]
    roi_count = roi.sum(1)  # [B]
    r = int(roi_count.max()) if b > 0 else 0
    if r > 0:
        order = torch.sort((~roi).to(torch.uint8), dim=1, stable=True).indices[:, :r]  # row-major
        pix_ok = torch.arange(r, device=feat.device)[None, :] < roi_count[:, None]  # [B, R]
        f_roi = torch.gather(f.transpose(1, 2), 1, order[:, :, None].expand(b, r, c))  # [B, R, C]
        xy_roi = _grid_coords(h, w, wd, feat.device)[order]  # [B, R, 2]
        no_roi = (roi_count == 0)[:, None, None]
        pad = ~pix_ok[:, :, None]
        for _ in range(n_iter):
            # exact squared differences (no ||f||^2 + ||c||^2 - 2 f.c expansion, see the docstring)
            feat_d2 = torch.cdist(f_roi, c_feat, compute_mode="donot_use_mm_for_euclid_dist").pow_(2)
            spat_d2 = (xy_roi[:, :, None, :] - c_xy[:, None, :, :]).pow_(2).sum(3)  # [B, R, S]
            logits = feat_d2.add_(spat_d2, alpha=1.0 / SPATIAL_DIVISOR).sqrt_().neg_()  # [B, R, S]
            logits.masked_fill_(pad, float("-inf"))
            assoc = torch.softmax(logits, dim=1).masked_fill_(no_roi, 0.0)  # over ROI pixels
            at = assoc.transpose(1, 2)  # [B, S, R]
            c_feat = torch.bmm(at, f_roi)  # empty ROI -> zero centres (official)
            c_xy = torch.bmm(at, xy_roi)
    else:
        c_feat = torch.zeros_like(c_feat)

    slot0 = torch.zeros(b, s, dtype=torch.bool, device=feat.device)
    slot0[:, 0] = True
    fallback = torch.zeros_like(c_feat)
    fallback[:, 0] = map_proto
    protos = torch.where(clustered[:, None, None], c_feat.masked_fill(~slot_used[..., None], 0.0), fallback)
    valid = torch.where(clustered[:, None], slot_used, slot0)
    return protos.to(feat.dtype), valid


# --------------------------------------------------------------------------------------------
# Guided prototype allocation
# --------------------------------------------------------------------------------------------


def guided_prototype_allocation(
    query_feat: torch.Tensor,
    protos: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = COS_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided prototype allocation (official "Guided Prototype Allocation" block).

    Args:
        query_feat: query features ``[B, C, h, w]`` (keeps its autograd graph).
        protos: prototypes ``[B, N, C]`` (e.g. ``[B, K*S, C]`` for K shots).
        valid: ``[B, N]`` bool; invalid prototypes are ignored. ``None`` = all valid.
        eps: cosine-similarity epsilon (official 1e-7), with ``F.cosine_similarity``
            semantics ``x.y / (max(||x||, eps) * max(||y||, eps))``.

    Returns:
        ``(prob_map, guide)``: ``prob_map`` ``[B, 1, h, w]`` = the **sum** over valid
        prototypes of the cosine similarity between the prototype and the query pixel (with a
        single prototype, that similarity itself); ``guide`` ``[B, C, h, w]`` = at each pixel
        the valid prototype with the largest similarity (hard argmax, ties -> lowest index).
        An element without any valid prototype gets zeros in both outputs. The head consumes
        ``cat(query_feat, guide)`` and ``prob_map``.

    Gradients reach ``query_feat`` through ``prob_map`` (the argmax is not differentiable),
    and ``protos`` through both outputs if they require grad (ASGNet's prototypes do not).
    """
    if query_feat.dim() != 4 or protos.dim() != 3:
        raise ValueError("query_feat must be [B, C, h, w] and protos [B, N, C]")
    b, c, h, w = query_feat.shape
    if protos.shape[0] != b or protos.shape[2] != c:
        raise ValueError(f"protos must be [{b}, N, {c}], got {tuple(protos.shape)}")
    n = protos.shape[1]
    protos = protos.to(dtype=query_feat.dtype, device=query_feat.device)
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=query_feat.device)
    valid = valid.to(device=query_feat.device, dtype=torch.bool)

    q = query_feat.reshape(b, c, h * w)
    q_n = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    p_n = protos / protos.norm(dim=2, keepdim=True).clamp_min(eps)
    cos = torch.bmm(p_n, q_n)  # [B, N, P]

    inv = ~valid[:, :, None]
    prob_map = cos.masked_fill(inv, 0.0).sum(1).reshape(b, 1, h, w)
    index = cos.detach().masked_fill(inv, float("-inf")).argmax(1)  # [B, P]
    guide = torch.gather(protos.transpose(1, 2), 2, index[:, None, :].expand(b, c, h * w))
    guide = guide * valid.any(1).to(guide.dtype)[:, None, None]
    return prob_map, guide.reshape(b, c, h, w)
