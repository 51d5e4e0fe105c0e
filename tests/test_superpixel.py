"""Tests of the ASGNet superpixel ops (seeds, SGC, batched SGC, GPA). CPU, fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt, gaussian_filter

from fewshotseg.ops.superpixel import (
    batched_superpixel_clustering,
    guided_prototype_allocation,
    place_seeds,
    place_seeds_batch,
    seed_grid_shape,
    seeds_to_padded,
    superpixel_clustering,
)

# --------------------------------------------------------------------------------------------
# helpers / references
# --------------------------------------------------------------------------------------------


def grid_rows(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index floor(dst * in / out) in exact integer arithmetic."""
    return (np.arange(n_out) * n_in) // n_out


def grid_to_input(grid: np.ndarray, height: int, width: int, value: int = 1) -> np.ndarray:
    """Blow a grid-level mask up to input resolution so that nearest downsampling returns it.

    Every grid cell (i, j) becomes the block of input pixels whose nearest cell is (i, j); the
    rest of the image is 0 (with a sprinkle of the ignore label 255 in background blocks).
    """
    gh, gw = grid.shape
    rs = list(grid_rows(height, gh)) + [height]
    cs = list(grid_rows(width, gw)) + [width]
    out = np.zeros((height, width), dtype=np.uint8)
    for i in range(gh):
        for j in range(gw):
            blk = out[rs[i] : rs[i + 1], cs[j] : cs[j + 1]]
            if grid[i, j]:
                blk[...] = value
            elif (i + j) % 7 == 0:
                blk[...] = 255  # ignore label: never foreground
    return out


def grid_with_cells(n_cells: int, shape=(60, 60), top=3, left=4, width=31) -> np.ndarray:
    """Grid mask with exactly ``n_cells`` foreground cells (row-major fill of a band)."""
    g = np.zeros(shape, dtype=bool)
    for k in range(n_cells):
        g[top + k // width, left + k % width] = True
    return g


def reference_seeds(grid: np.ndarray, max_num=5, avg_area=100) -> np.ndarray:
    """Plain re-statement of the seed rule on an already downsampled grid."""
    ys, xs = np.where(grid)
    if len(ys) == 0:
        return np.zeros((0, 2), np.int64)
    y0, x0 = ys.min(), xs.min()
    roi = grid[y0 : ys.max() + 1, x0 : xs.max() + 1].astype(float)
    num = int(min(np.round(roi.sum() / avg_area), max_num))
    if num in (0, 1):
        return np.zeros((0, 2), np.int64)
    out = []
    for _ in range(num):
        d = distance_transform_edt(roi)
        where = np.nonzero(d == d.max())
        y, x = where[0][0], where[1][0]
        roi[y, x] = 0
        out.append((y + y0, x + x0))
    return np.array(out, dtype=np.int64)


def reference_sgc(feat, mask, seeds, n_iter):
    """SGC written the way the official loop does it: explicit exp(-D) and division."""
    c, h, w = feat.shape
    rows = torch.arange(h, dtype=feat.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=feat.dtype)[None, :].expand(h, w)
    aug = torch.cat([feat, rows[None], cols[None]], 0)  # (C+2, h, w)
    pix = aug[:, mask == 1]  # (C+2, R)
    centres = torch.cat([feat[:, seeds[:, 0], seeds[:, 1]], seeds.t().to(feat.dtype)], 0)  # (C+2, n)
    for _ in range(n_iter):
        diff2 = (pix[:, :, None] - centres[:, None, :]) ** 2  # (C+2, R, n)
        dist = torch.sqrt(diff2[:-2].sum(0) + diff2[-2:].sum(0) / 100)
        q = torch.exp(-dist)
        q = q / q.sum(0, keepdim=True)
        centres = (pix[:, :, None] * q[None]).sum(1)
    return centres[:-2].t()  # (n, C)


def map_proto(feat, mask):
    return (feat * mask).sum((1, 2)) / (mask.sum() + 0.0005)


def random_case(gen, c=16, h=20, w=22, soft=True):
    feat = torch.randn(c, h, w, generator=gen)
    feat = F.avg_pool2d(feat[None], 3, 1, 1)[0] * 2  # spatially smooth, like CNN features
    mask = torch.zeros(h, w)
    r0, c0 = torch.randint(0, h // 3, (2,), generator=gen).tolist()
    mask[r0 : r0 + h // 2 + 2, c0 : c0 + w // 2 + 3] = 1.0
    if soft:  # soft boundary ring, like the bilinear downsampled mask
        ring = (F.max_pool2d(mask[None, None], 3, 1, 1)[0, 0] > 0) & (mask == 0)
        mask[ring] = torch.rand(int(ring.sum()), generator=gen) * 0.9 + 0.05
    return feat, mask


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cells,expected",
    [(50, 0), (51, 0), (149, 0), (150, 2), (250, 2), (251, 3), (349, 3), (350, 4), (450, 4), (451, 5)],
)
def test_seed_count_at_rounding_boundaries(cells, expected):
    grid = grid_with_cells(cells)
    mask = grid_to_input(grid, 473, 473)
    seeds = place_seeds(mask)
    assert seeds.dtype == np.int64 and seeds.shape == (expected, 2)
    # torch input, exact count of the downsampled cells, same seeds as the plain reference
    np.testing.assert_array_equal(place_seeds(torch.from_numpy(mask)), seeds)
    np.testing.assert_array_equal(seeds, reference_seeds(grid))


def test_downsampling_recovers_grid_and_seeds_are_distinct_foreground_cells():
    rng = np.random.default_rng(0)
    for _ in range(10):
        grid = np.zeros((60, 60), bool)
        for _ in range(3):  # union of random rectangles
            r, c = rng.integers(0, 45, 2)
            grid[r : r + rng.integers(5, 15), c : c + rng.integers(5, 15)] = True
        seeds = place_seeds(grid_to_input(grid, 473, 473))
        np.testing.assert_array_equal(seeds, reference_seeds(grid))
        assert 2 <= len(seeds) <= 5
        assert grid[seeds[:, 0], seeds[:, 1]].all()
        assert len({tuple(s) for s in seeds.tolist()}) == len(seeds)


def test_non_square_mask():
    grid = np.zeros((60, 41), bool)  # 473 x 321 input -> 60 x 41 cells
    grid[10:50, 30:41] = True  # 440 cells, touching the right border
    grid[40:55, 2:12] = True  # + 150 cells -> 5 seeds
    mask = grid_to_input(grid, 473, 321)
    seeds = place_seeds(mask)
    assert seeds.shape == (5, 2)
    assert seeds[:, 0].max() < 60 and seeds[:, 1].max() < 41
    assert grid[seeds[:, 0], seeds[:, 1]].all()
    np.testing.assert_array_equal(seeds, reference_seeds(grid))
    # the transposed image gives the transposed seeds (rows and columns handled separately)
    seeds_t = place_seeds(grid_to_input(grid.T.copy(), 321, 473))
    assert grid.T[seeds_t[:, 0], seeds_t[:, 1]].all()


def test_empty_mask_and_options():
    assert place_seeds(np.zeros((473, 473))).shape == (0, 2)
    assert place_seeds(np.full((473, 473), 255)).shape == (0, 2)  # ignore label is not fg
    grid = grid_with_cells(700)
    mask = grid_to_input(grid, 473, 473)
    assert len(place_seeds(mask)) == 5
    assert len(place_seeds(mask, max_num=7)) == 7
    assert len(place_seeds(mask, avg_area=50)) == 5
    assert len(place_seeds(mask, max_num=1)) == 0
    # 641 x 641 (COCO) -> 81 x 81 grid
    grid81 = np.zeros((81, 81), bool)
    grid81[20:60, 10:70] = True
    seeds = place_seeds(grid_to_input(grid81, 641, 641))
    np.testing.assert_array_equal(seeds, reference_seeds(grid81))


def test_filled_rectangle_uses_scipy_edt_without_background():
    grid = np.zeros((60, 60), bool)
    grid[10:30, 20:30] = True  # 200 cells, bbox entirely foreground -> 2 seeds
    seeds = place_seeds(grid_to_input(grid, 473, 473))
    np.testing.assert_array_equal(seeds, reference_seeds(grid))
    assert grid[seeds[:, 0], seeds[:, 1]].all() and len(seeds) == 2


def test_gaussian_sigma_01_is_identity_on_distance_transforms():
    rng = np.random.default_rng(1)
    for _ in range(5):
        roi = (rng.random((40, 30)) > 0.2).astype(float)
        d = distance_transform_edt(roi)
        np.testing.assert_array_equal(gaussian_filter(d, sigma=0.1), d)


def test_nearest_downsampling_matches_cv2():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    for size in (172, 174, 258, 473, 641, 300, 97):
        mask = (rng.random((size, size)) > 0.5).astype(np.float32)
        down = int((size - 1) / 8 + 1)
        expected = cv2.resize(mask, dsize=(down, down), interpolation=cv2.INTER_NEAREST)
        from fewshotseg.ops.superpixel import _nearest_src_index

        idx = _nearest_src_index(size, down)
        np.testing.assert_array_equal(mask[np.ix_(idx, idx)], expected)


def test_seeds_to_padded_counts_seed_at_origin():
    seeds, counts = seeds_to_padded(
        [np.array([[0, 0], [5, 6]]), np.zeros((0, 2), np.int64), torch.tensor([[1, 2], [3, 4], [0, 0]])], 5
    )
    assert seeds.shape == (3, 5, 2) and seeds.dtype == torch.long
    assert counts.tolist() == [2, 0, 3]
    assert seeds[0, :2].tolist() == [[0, 0], [5, 6]] and seeds[0, 2:].abs().sum() == 0
    with pytest.raises(ValueError):
        seeds_to_padded([np.zeros((6, 2), np.int64)], 5)


def test_place_seeds_batch_equals_place_seeds_per_mask():
    rng = np.random.default_rng(3)
    masks = []
    for k in range(7):
        grid = np.zeros((60, 60), bool)
        if k:  # k == 0: empty mask
            for _ in range(k % 3 + 1):
                r, c = rng.integers(0, 40, 2)
                grid[r : r + rng.integers(4, 20), c : c + rng.integers(4, 20)] = True
        masks.append(grid_to_input(grid, 473, 473))
    masks = torch.from_numpy(np.stack(masks).astype(np.int64))
    seeds, counts = place_seeds_batch(masks)
    assert seeds.shape == (7, 5, 2) and counts.dtype == torch.long
    for i in range(7):
        expected = place_seeds(masks[i])
        assert counts[i] == len(expected)
        np.testing.assert_array_equal(seeds[i, : counts[i]].numpy(), expected)
        assert (seeds[i, counts[i] :] == 0).all()
    assert counts.tolist()[0] == 0 and counts.max() >= 2
    # other strides / options and non-square inputs follow place_seeds too
    small = masks[:, :113, :97].contiguous()
    seeds, counts = place_seeds_batch(small, max_num=3, avg_area=10, stride=4)
    for i in range(7):
        np.testing.assert_array_equal(seeds[i, : counts[i]].numpy(), place_seeds(small[i], 3, 10, 4))
    assert seed_grid_shape(473, 473) == (60, 60) and seed_grid_shape(641, 321) == (81, 41)
    assert seed_grid_shape(65, 64) == (9, 8)


# --------------------------------------------------------------------------------------------
# superpixel clustering (single element)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_iter", [1, 5, 10])
def test_sgc_matches_official_style_reference(n_iter):
    gen = torch.Generator().manual_seed(n_iter)
    checked = 0
    for _ in range(6):
        feat, mask = random_case(gen)
        fg = torch.nonzero(mask > 0)
        seeds = fg[torch.randperm(len(fg), generator=gen)[:4]]  # may lie on the soft ring
        ref = reference_sgc(feat, mask, seeds, n_iter)
        out = superpixel_clustering(feat, mask, seeds, n_iter)
        assert out.shape == (4, feat.shape[0]) and torch.isfinite(out).all()
        finite = torch.isfinite(ref).all(1)
        checked += int(finite.sum())
        torch.testing.assert_close(out[finite], ref[finite], atol=1e-4, rtol=1e-4)
    assert checked > 0


def test_sgc_two_groups():
    gen = torch.Generator().manual_seed(0)
    c, h, w = 8, 12, 16
    a = torch.linspace(-1, 1, c) * 3
    b = -a + 1
    feat = torch.empty(c, h, w)
    feat[:, :, : w // 2] = a[:, None, None]
    feat[:, :, w // 2 :] = b[:, None, None]
    feat += 0.01 * torch.randn(c, h, w, generator=gen)
    mask = torch.ones(h, w)
    seeds = torch.tensor([[6, 3], [5, 12]])
    out = superpixel_clustering(feat, mask, seeds, 10)
    left = feat[:, :, : w // 2].mean((1, 2))
    right = feat[:, :, w // 2 :].mean((1, 2))
    torch.testing.assert_close(out[0], left, atol=0.02, rtol=0)
    torch.testing.assert_close(out[1], right, atol=0.02, rtol=0)
    torch.testing.assert_close(out, reference_sgc(feat, mask, seeds, 10), atol=1e-4, rtol=1e-4)


def test_sgc_degenerate_inputs_never_nan():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(16, 10, 10, generator=gen)
    seeds = torch.tensor([[2, 3], [7, 7]])

    # empty ROI (no pixel exactly 1): the official sum over zero pixels gives zero centres
    soft = torch.full((10, 10), 0.5)
    assert (reference_sgc(feat, soft, seeds, 5) == 0).all()
    assert (superpixel_clustering(feat, soft, seeds, 5) == 0).all()

    # one ROI pixel: every centre collapses onto it
    one = torch.zeros(10, 10)
    one[4, 5] = 1
    out = superpixel_clustering(feat, one, seeds, 5)
    torch.testing.assert_close(out, feat[:, 4, 5][None].expand(2, -1), atol=1e-6, rtol=0)

    # features far apart, seed outside the ROI: exp(-D) underflows everywhere (official NaN)
    big = feat * 1e3
    roi = torch.zeros(10, 10)
    roi[5:, 5:] = 1
    seeds_out = torch.tensor([[0, 0], [1, 9]])
    assert torch.isnan(reference_sgc(big, roi, seeds_out, 5)).all()
    out = superpixel_clustering(big, roi, seeds_out, 5)
    assert torch.isfinite(out).all()
    # the centre snaps to the ROI pixel nearest to its seed in (feature, position) space
    pix = big[:, roi == 1].t()
    rr, cc = torch.nonzero(roi == 1).t()
    for k, (r, col) in enumerate(seeds_out.tolist()):
        d2 = ((pix - big[:, r, col]) ** 2).sum(1) + ((rr - r) ** 2 + (cc - col) ** 2) / 100
        torch.testing.assert_close(out[k], pix[d2.argmin()], atol=1e-3, rtol=1e-6)

    # n_iter = 0 is rejected; no seeds -> no prototypes
    with pytest.raises(ValueError):
        superpixel_clustering(feat, roi, seeds, 0)
    assert superpixel_clustering(feat, roi, torch.zeros(0, 2, dtype=torch.long), 5).shape == (0, 16)


def test_sgc_dtype_device_and_no_grad():
    gen = torch.Generator().manual_seed(4)
    feat, mask = random_case(gen)
    feat.requires_grad_(True)
    seeds = torch.nonzero(mask == 1)[:3]
    out32 = superpixel_clustering(feat, mask, seeds, 5)
    assert not out32.requires_grad and out32.dtype == torch.float32
    out64 = superpixel_clustering(feat.double(), mask.double(), seeds, 5)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, atol=1e-5, rtol=1e-5)
    out16 = superpixel_clustering(feat.detach().half(), mask, seeds, 5)
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    with pytest.raises(ValueError):
        superpixel_clustering(feat, mask, torch.tensor([[0, 99]]), 5)


# --------------------------------------------------------------------------------------------
# batched clustering
# --------------------------------------------------------------------------------------------


def per_element(feat, mask, seeds, counts, n_iter):
    protos = []
    for i in range(feat.shape[0]):
        n = int(counts[i])
        if n <= 1:
            protos.append(map_proto(feat[i], mask[i])[None])
        else:
            protos.append(superpixel_clustering(feat[i], mask[i], seeds[i, :n], n_iter))
    return protos


@pytest.mark.parametrize("n_iter", [5, 10])
def test_batched_equals_per_element(n_iter):
    gen = torch.Generator().manual_seed(10 + n_iter)
    counts = [0, 2, 1, 3, 5, 4, 0, 2, 5, 3]
    feats, masks, seeds_list = [], [], []
    for i, n in enumerate(counts):
        feat, mask = random_case(gen, soft=i % 2 == 0)
        if i == 7:
            mask = mask * 0.5  # clustered element with an empty ROI -> zero prototypes
        if i == 6:
            mask = torch.zeros_like(mask)  # empty mask, MAP fallback -> zero prototype
        fg = torch.nonzero(mask > 0)
        pick = fg[torch.randperm(len(fg), generator=gen)[:n]] if len(fg) else torch.zeros(n, 2).long()
        feats.append(feat)
        masks.append(mask)
        seeds_list.append(pick)
    feat, mask = torch.stack(feats), torch.stack(masks)
    seeds, num = seeds_to_padded(seeds_list, 5)
    seeds[num < 5, -1] = -7  # garbage in the padding is ignored
    protos, valid = batched_superpixel_clustering(feat, mask, seeds, num, n_iter)
    assert protos.shape == (10, 5, 16) and valid.shape == (10, 5) and valid.dtype == torch.bool
    assert valid.sum(1).tolist() == [max(n, 1) if n >= 2 else 1 for n in counts]
    expected = per_element(feat, mask, seeds, num, n_iter)
    for i in range(10):
        assert valid[i, : len(expected[i])].all()
        torch.testing.assert_close(protos[i, valid[i]], expected[i], atol=1e-5, rtol=1e-5)
        assert (protos[i, ~valid[i]] == 0).all()
    assert (protos[6] == 0).all() and (protos[7] == 0).all()
    assert torch.isfinite(protos).all()


def test_batched_end_to_end_from_input_masks():
    """Seeds from 473x473 masks, features on the 60x60 grid, bilinear align_corners mask."""
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    labels, seeds_list = [], []
    for k in range(6):
        grid = np.zeros((60, 60), bool)
        size = [5, 9, 13, 17, 21, 25][k]
        r, c = rng.integers(0, 60 - size, 2)
        grid[r : r + size, c : c + size] = True
        label = grid_to_input(grid, 473, 473)
        labels.append(torch.from_numpy(label.astype(np.int64)))
        seeds_list.append(place_seeds(label))
    seeds, num = seeds_to_padded(seeds_list, 5)
    assert num.tolist() == [0, 0, 2, 3, 4, 5]
    lab = torch.stack(labels)
    fg = (lab == 1).float()[:, None]
    mask = F.interpolate(fg, size=(60, 60), mode="bilinear", align_corners=True)[:, 0]
    feat = F.avg_pool2d(torch.randn(6, 32, 60, 60, generator=gen), 3, 1, 1) * 3
    protos, valid = batched_superpixel_clustering(feat, mask[:, None], seeds, num, 5)
    expected = per_element(feat, mask, seeds, num, 5)
    for i in range(6):
        torch.testing.assert_close(protos[i, valid[i]], expected[i], atol=1e-5, rtol=1e-5)


def test_batched_dtypes_and_no_grad():
    gen = torch.Generator().manual_seed(6)
    feat, mask = random_case(gen)
    feat = torch.stack([feat, feat * 2]).requires_grad_(True)
    mask = torch.stack([mask, mask])
    seeds, num = seeds_to_padded([torch.nonzero(mask[0] == 1)[:3], torch.zeros(0, 2)], 5)
    protos, valid = batched_superpixel_clustering(feat, mask, seeds, num, 5)
    assert not protos.requires_grad
    p64, v64 = batched_superpixel_clustering(feat.double(), mask.double(), seeds, num, 5)
    assert p64.dtype == torch.float64 and torch.equal(v64, valid)
    torch.testing.assert_close(p64.float(), protos, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        batched_superpixel_clustering(feat, mask, seeds, torch.tensor([6, 0]), 5)


# --------------------------------------------------------------------------------------------
# guided prototype allocation
# --------------------------------------------------------------------------------------------


def test_gpa_matches_per_pixel_loop():
    gen = torch.Generator().manual_seed(7)
    b, c, h, w, n = 3, 8, 5, 6, 7
    query = torch.randn(b, c, h, w, generator=gen)
    query[0, :, 0, 0] = 0  # zero query pixel: similarity 0, not NaN
    protos = torch.randn(b, n, c, generator=gen)
    valid = torch.rand(b, n, generator=gen) > 0.4
    valid[:, 2] = True
    valid[2] = False
    valid[2, 4] = True  # one valid prototype
    prob, guide = guided_prototype_allocation(query, protos, valid)
    assert prob.shape == (b, 1, h, w) and guide.shape == (b, c, h, w)
    for i in range(b):
        idx = torch.nonzero(valid[i])[:, 0]
        for y in range(h):
            for x in range(w):
                sims = torch.stack(
                    [F.cosine_similarity(query[i, :, y, x], protos[i, k], dim=0, eps=1e-7) for k in idx]
                )
                torch.testing.assert_close(prob[i, 0, y, x], sims.sum(), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(guide[i, :, y, x], protos[i, idx[sims.argmax()]])
    assert torch.isfinite(prob).all()


def test_gpa_single_prototype_is_official_one_shot_branch():
    gen = torch.Generator().manual_seed(8)
    query = torch.randn(2, 16, 7, 7, generator=gen)
    protos = torch.randn(2, 1, 16, generator=gen)
    prob, guide = guided_prototype_allocation(query, protos)
    cos = F.cosine_similarity(protos[:, 0, :, None, None], query, dim=1, eps=1e-7)
    torch.testing.assert_close(prob[:, 0], cos)
    torch.testing.assert_close(guide, protos[:, 0, :, None, None].expand(-1, -1, 7, 7))


def test_gpa_no_valid_prototype_and_gradient():
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(2, 8, 4, 4, generator=gen, requires_grad=True)
    protos = torch.randn(2, 3, 8, generator=gen)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    prob, guide = guided_prototype_allocation(query, protos, valid)
    assert (prob[1] == 0).all() and (guide[1] == 0).all()
    prob.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad[0].abs().sum() > 0
