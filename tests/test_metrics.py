import numpy as np
import pytest
import torch

from fewshotseg.metrics import FewShotIoU


def reference(preds, targets, classes, num_classes):
    """The FB-IoU / mIoU definitions of docs/protocols.md with numpy, one episode at a time."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    seen = np.zeros(num_classes, bool)
    fb_i, fb_u = np.zeros(2), np.zeros(2)
    for p, t, c in zip(preds, targets, classes):
        valid = t != 255
        for k, (pk, tk) in enumerate([(p == 0, t == 0), (p == 1, t == 1)]):
            fb_i[k] += np.sum(pk & tk & valid)
            fb_u[k] += np.sum((pk | tk) & valid)
        inter[c] += np.sum((p == 1) & (t == 1) & valid)
        union[c] += np.sum(((p == 1) | (t == 1)) & valid)
        seen[c] = True
    iou = inter[seen] / np.maximum(union[seen], 1)
    return iou.mean(), (fb_i / fb_u).mean(), dict(zip(np.flatnonzero(seen), iou))


def random_episodes(n, num_classes, seed, size=(13, 17)):
    rng = np.random.default_rng(seed)
    preds = rng.integers(0, 2, (n, *size))
    targets = rng.choice([0, 1, 255], p=[0.5, 0.4, 0.1], size=(n, *size))
    classes = rng.integers(0, num_classes, n)
    classes[classes == 3] = 4  # class 3 never occurs: it must be left out of the mean
    return preds, targets, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference_over_uneven_batches(seed):
    preds, targets, classes = random_episodes(37, num_classes=6, seed=seed)
    metric = FewShotIoU(num_classes=6)
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 30), (30, 37)]:  # uneven batches
        metric.update(
            torch.from_numpy(preds[lo:hi]), torch.from_numpy(targets[lo:hi]), torch.from_numpy(classes[lo:hi])
        )
    out = metric.compute()
    miou, fbiou, per_class = reference(preds, targets, classes, 6)
    assert out["miou"].item() == pytest.approx(miou, abs=1e-12)
    assert out["fbiou"].item() == pytest.approx(fbiou, abs=1e-12)
    assert torch.isnan(out["iou_per_class"][3])
    for c, v in per_class.items():
        assert out["iou_per_class"][c].item() == pytest.approx(v, abs=1e-12)


def test_accumulates_sums_not_mean_of_episode_ious():
    # Episode A: tiny object missed entirely; episode B: large object found exactly.
    small_t = torch.zeros(1, 10, 10, dtype=torch.long)
    small_t[0, 0, 0] = 1
    big_t = torch.zeros(1, 10, 10, dtype=torch.long)
    big_t[0, :, :5] = 1
    metric = FewShotIoU(num_classes=1)
    metric.update(torch.zeros_like(small_t), small_t, torch.tensor([0]))
    metric.update(big_t.clone(), big_t, torch.tensor([0]))
    assert metric.compute()["miou"].item() == pytest.approx(50 / 51)  # not (0 + 1) / 2


def test_ignore_pixels_do_not_count():
    target = torch.full((1, 4, 4), 255)
    target[0, 0, :2] = 1
    target[0, 1, :2] = 0
    pred = torch.ones(1, 4, 4, dtype=torch.long)  # foreground everywhere, including ignored pixels
    metric = FewShotIoU(num_classes=2)
    metric.update(pred, target, torch.tensor([1]))
    out = metric.compute()
    assert out["miou"].item() == pytest.approx(0.5)  # I = 2, U = 4 (the 12 ignored pixels excluded)
    assert out["fbiou"].item() == pytest.approx((0 / 2 + 2 / 4) / 2)


def test_states_merge_like_ddp():
    preds, targets, classes = random_episodes(20, num_classes=5, seed=7)
    whole, part_a, part_b = FewShotIoU(5), FewShotIoU(5), FewShotIoU(5)
    whole.update(torch.from_numpy(preds), torch.from_numpy(targets), torch.from_numpy(classes))
    part_a.update(
        torch.from_numpy(preds[::2]), torch.from_numpy(targets[::2]), torch.from_numpy(classes[::2])
    )
    part_b.update(
        torch.from_numpy(preds[1::2]), torch.from_numpy(targets[1::2]), torch.from_numpy(classes[1::2])
    )
    part_a.merge_state(part_b)  # what the sum reduction does across ranks
    assert part_a.compute()["miou"].item() == whole.compute()["miou"].item()
    assert part_a.compute()["fbiou"].item() == whole.compute()["fbiou"].item()


def test_rejects_bad_class_index():
    metric = FewShotIoU(num_classes=3)
    with pytest.raises(ValueError, match=r"class_idx"):
        metric.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([3]))


def test_the_metric_counts_the_episodes_it_scored():
    metric = FewShotIoU(num_classes=3)
    pred = torch.zeros(4, 2, 2, dtype=torch.long)
    metric.update(pred, pred, torch.tensor([0, 1, 1, 2]))
    assert int(metric.compute()["episodes"]) == 4  # what `train` prints as "test episodes"
