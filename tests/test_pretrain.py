"""QGNet stage 1 (`python -m fewshotseg.pretrain`): views and superpixels, the InfoNCE terms, region
pooling, learning on synthetic images, the export that method=qgnet loads, DDP helpers, the CLI."""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hydra.utils import instantiate

from fewshotseg.backbones import Backbone
from fewshotseg.contrastive import (
    GlobalLocalMoCo,
    concat_all_gather,
    export_from_checkpoint,
    export_prior_extractor,
    info_nce,
    matched_regions,
    region_areas,
    region_pool,
    region_weights,
    shuffle_across_ranks,
    unshuffle_across_ranks,
)
from fewshotseg.data.sources.synthetic import SyntheticSource
from fewshotseg.data.unlabeled import SuperpixelCache, UnlabeledDataModule, ViewTransform, compute_superpixels
from fewshotseg.errors import ConfigError
from fewshotseg.pretrain import pretrain
from helpers import SMALL, compose_config, run_cli

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255

# Tiny settings for the CLI: ResNet-18, 64 px views of the 64 px synthetic images, 2 steps of 4 images.
PRETRAIN_TINY = [
    "backbone=resnet18",
    "debug=tiny",
    "trainer.limit_train_batches=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    f"data.source.num_train={SMALL['num_train']}",
    f"data.source.num_val={SMALL['num_val']}",
    f"data.source.image_size={SMALL['image_size']}",
    "unlabeled.batch_size=4",
    "unlabeled.views.size=64",
    "unlabeled.views.scale=[0.4,1.0]",
    "unlabeled.superpixel.n_segments=12",
    "model.queue_size=16",
    "model.min_cells=2",
]


def compose_pretrain_cfg(tmp_path: Path, data_dir: Path, overrides: list[str] = ()):
    """The pretrain config as the CLI builds it, outputs under tmp_path (see conftest.compose_train_cfg)."""
    return compose_config(
        "pretrain",
        [*PRETRAIN_TINY, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}", *overrides],
        output_dir=tmp_path,
    )


def tiny_datamodule(root: Path, **kwargs) -> UnlabeledDataModule:
    args = dict(batch_size=8, num_workers=0, views=ViewTransform(size=64, scale=(0.4, 1.0)),
                superpixel={"method": "slic", "n_segments": 12, "compactness": 10.0})  # fmt: skip
    return UnlabeledDataModule(str(root), functools.partial(SyntheticSource, **SMALL), **{**args, **kwargs})


def tiny_model(**kwargs) -> GlobalLocalMoCo:
    backbone = functools.partial(Backbone, name="resnet18", bn_mode="train")
    return GlobalLocalMoCo(backbone, **{"queue_size": 64, "min_cells": 2, **kwargs})


# ------------------------------------------------------------------------------------------------
# Views and superpixels
# ------------------------------------------------------------------------------------------------


def coordinate_image(h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red/green encode x/y (linear ramps survive bilinear resizing) and a region map
    that names every pixel (id = y * w + x)."""
    y, x = np.mgrid[:h, :w]
    image = np.stack([x * 3, y * 4, np.full_like(x, 128)], -1).astype(np.uint8)
    return image, (y * w + x).astype(np.uint16)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_superpixel_map_follows_the_crop_and_flip_of_its_view(flip_p):
    image, regions = coordinate_image()
    geometric_only = dict(size=32, scale=(0.2, 0.6), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    views = ViewTransform(**geometric_only, flip_p=flip_p)
    views.set_seed(5)
    crops = []
    for _ in range(2):  # two views of one image: independent crops
        view, view_regions = views(image, regions)
        assert (
            view.shape == (3, 32, 32) and view_regions.shape == (32, 32) and view_regions.dtype == torch.int16
        )
        raw = view.numpy().transpose(1, 2, 0) * STD + MEAN
        ys, xs = np.divmod(view_regions.numpy().astype(int), regions.shape[1])
        # every view pixel's region is the one under the image pixel it shows (nearest vs bilinear: <= 1 px)
        assert np.abs(xs - raw[..., 0] / 3).max() <= 1.01
        assert np.abs(ys - raw[..., 1] / 4).max() <= 1.01
        assert np.all(np.diff(xs, axis=1) <= 0) if flip_p else np.all(np.diff(xs, axis=1) >= 0)
        assert np.all(np.diff(ys, axis=0) >= 0)  # never flipped vertically
        crops.append((xs.min(), xs.max(), ys.min(), ys.max()))
        assert (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1) < 0.7 * regions.size  # a crop
    assert crops[0] != crops[1]

    # The same draws with and without the flip: the region map is exactly mirrored.
    plain = ViewTransform(**geometric_only, flip_p=0.0)
    flipped = ViewTransform(**geometric_only, flip_p=1.0)
    plain.set_seed(11)
    flipped.set_seed(11)
    assert torch.equal(flipped(image, regions)[1], plain(image, regions)[1].flip(-1))


def test_colour_augmentation_leaves_the_region_map_alone():
    image, regions = coordinate_image()
    plain = ViewTransform(size=32, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    colour = ViewTransform(size=32, jitter_p=1.0, gray_p=1.0, blur_p=1.0)
    plain.set_seed(3)
    colour.set_seed(3)
    a, b = plain(image, regions), colour(image, regions)
    assert not torch.allclose(a[0], b[0])
    # geometric parameters are drawn the same way; the maps agree where the crops agree
    assert torch.equal(a[1], b[1])


def test_superpixels_are_dense_cached_and_checked(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    image[:, :25] = (200, 30, 30)
    for method in ("slic", "felzenszwalb"):
        sp = compute_superpixels(image, method=method, n_segments=8)
        assert sp.shape == (40, 50) and sp.dtype == np.uint16
        assert set(np.unique(sp)) == set(range(int(sp.max()) + 1))  # ids 0..n-1, no gaps
    cache = SuperpixelCache(tmp_path, method="slic", n_segments=8, compactness=10.0)
    first = cache("a/b", image)
    path = cache.path("a/b")
    assert path.is_file() and np.array_equal(np.load(path), first)
    np.save(path, np.zeros_like(first))  # a cached map is read, not recomputed
    assert not cache("a/b", image).any()
    other = SuperpixelCache(tmp_path, method="slic", n_segments=16, compactness=10.0)
    assert other.folder != cache.folder  # other parameters, another cache
    with pytest.raises(ConfigError, match="superpixel.method"):
        SuperpixelCache(tmp_path, method="quickshift")


def test_unlabeled_images_never_read_labels(synthetic_root, monkeypatch):
    dm = tiny_datamodule(synthetic_root, fold=1)
    dm.prepare_data()

    def no_labels(*args, **kwargs):
        raise AssertionError("a label was read")

    for name in ("load_label", "load_mask", "class_areas"):
        monkeypatch.setattr(SyntheticSource, name, no_labels)
    dm.setup()
    assert len(dm.train_set) == SMALL["num_train"]  # the whole training split, novel objects included
    item = dm.train_set[0]
    assert item["view1"].shape == item["view2"].shape == (3, 64, 64)
    assert item["regions1"].shape == (64, 64) and not torch.equal(item["view1"], item["view2"])
    monkeypatch.undo()

    strict = tiny_datamodule(synthetic_root, fold=1, exclude_novel_images=True)
    strict.prepare_data()
    strict.setup()
    from fewshotseg.data.index import load_class_index

    index = load_class_index(strict.source, "train")
    kept = strict.train_set.image_ids
    assert 0 < len(kept) < SMALL["num_train"]
    assert all(set(index[i]) <= set(strict.base) for i in kept)
    assert all(set(index[i]) - set(strict.base) for i in set(index) - set(kept))


# ------------------------------------------------------------------------------------------------
# Losses and region pooling
# ------------------------------------------------------------------------------------------------


def test_info_nce_matches_its_definition_and_prefers_true_positives():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    k = F.normalize(q + 0.3 * torch.randn(16, 32, generator=g), dim=1)
    queue = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    tau = 0.2

    def reference(q, k, negatives, batch):
        losses = []
        for i in range(len(q)):
            negs = [n for n in negatives] + ([k[j] for j in range(len(k)) if j != i] if batch else [])
            logits = torch.stack([q[i] @ k[i]] + [q[i] @ n for n in negs]) / tau
            losses.append(-(logits[0] - torch.logsumexp(logits, 0)))
        return torch.stack(losses).mean()

    for batch in (False, True):
        loss = info_nce(q, k, queue, tau, batch_negatives=batch)
        assert loss.item() == pytest.approx(reference(q, k, queue, batch).item(), rel=1e-5)
        shuffled = info_nce(q, k[torch.randperm(16, generator=g)], queue, tau, batch_negatives=batch)
        assert loss < shuffled - 1.0
    assert info_nce(q, q, None, tau).item() == 0.0  # a single logit: nothing to contrast


def test_region_pooling_is_masked_average_pooling_of_the_upsampled_features():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 5, 4, 6, generator=g)
    regions = torch.randint(-1, 4, (2, 16, 24), generator=g)  # 4x4 pixels per cell, -1: no region
    weights = region_weights(regions, 4, (4, 6))
    pooled = region_pool(feat, weights)
    up = F.interpolate(feat, size=(16, 24), mode="nearest")
    for b in range(2):
        for r in range(4):
            m = (regions[b] == r).float()
            if m.sum():
                expected = (up[b] * m).sum((1, 2)) / m.sum()
                torch.testing.assert_close(pooled[b, r], expected, atol=1e-5, rtol=1e-5)
            assert weights[b, r].sum().item() == pytest.approx(m.sum().item() / 16)  # area in cells
    torch.testing.assert_close(region_areas(regions, 4, (4, 6)), weights.sum(-1))


def test_matched_regions_keep_regions_large_in_both_views_with_one_numbering():
    # 8x8 pixels, 4x4 cells of 2x2 pixels. Region 0: 8 cells in both views; region 1: 4 and 2 cells;
    # region 2: only in view 2; region 3: 4 cells in both.
    r1 = torch.zeros(1, 8, 8, dtype=torch.long)
    r1[0, 4:, :4] = 1
    r1[0, 4:, 4:] = 3
    r2 = torch.zeros(1, 8, 8, dtype=torch.long)
    r2[0, 4:6, :4] = 1
    r2[0, 6:, :4] = 2
    r2[0, 4:, 4:] = 3
    n1, n2, valid = matched_regions(r1, r2, (4, 4), min_cells=4)
    assert valid.tolist() == [[True, True]]
    assert set(n1.unique().tolist()) == {-1, 0, 1} and set(n2.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(n1 == 0, r1 == 0) and torch.equal(n2 == 1, r2 == 3)  # 0 -> 0, 3 -> 1


# ------------------------------------------------------------------------------------------------
# Learning and export
# ------------------------------------------------------------------------------------------------


def in_batch_losses(model: GlobalLocalMoCo, batch: dict) -> tuple[float, float]:
    """Global and local InfoNCE with the other images / regions of the batch as negatives: unlike the
    training loss, it does not depend on what the queue holds (which turns from random vectors into
    real keys during the first steps, so the MoCo loss first rises)."""
    with torch.no_grad():
        feat = model.encoder_q.backbone(batch["view1"])[4]
        r1, r2, valid = matched_regions(
            batch["regions1"].long(), batch["regions2"].long(), tuple(feat.shape[-2:]), model.min_cells
        )
        q, q_regions = model.encoder_q.embed(feat, r1, valid.shape[1])
        k, k_regions = model.encoder_k(batch["view2"], r2, valid.shape[1])
        assert valid.sum() >= 16
        return (
            info_nce(q, k, tau=model.tau, batch_negatives=True).item(),
            info_nce(q_regions[valid], k_regions[valid], tau=model.tau, batch_negatives=True).item(),
        )


def test_a_few_steps_on_synthetic_images_lower_the_loss(synthetic_root):
    torch.manual_seed(0)
    dm = tiny_datamodule(synthetic_root)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model = tiny_model(momentum=0.99).train()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    before = in_batch_losses(model, batch)
    queue_before = model.queue.clone()
    for _ in range(6):
        out = model(batch)
        assert set(out) >= {"loss", "loss_global", "loss_local", "regions"}
        assert torch.isfinite(out["loss"]) and out["regions"] > 0
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = in_batch_losses(model, batch)
    assert after[0] < before[0] - 0.2 and after[1] < before[1] - 0.2, (before, after)
    assert model.queue_ptr.item() == 6 * 8 % 64 and not torch.equal(model.queue, queue_before)
    # the key encoder follows the query encoder slowly (EMA) and gets no gradient
    q_w, k_w = model.encoder_q.backbone.body.conv1.weight, model.encoder_k.backbone.body.conv1.weight
    assert k_w.grad is None and not torch.equal(q_w, k_w)


def test_the_export_has_no_heads_and_loads_into_a_resnet50_dilated_backbone(tmp_path):
    model = GlobalLocalMoCo(
        functools.partial(Backbone, name="resnet50_dilated", bn_mode="train"), queue_size=8
    )
    with torch.no_grad():  # make the two encoders differ, to see which one is exported
        for p in model.encoder_k.parameters():
            p.add_(1.0)
    path = export_prior_extractor(model, tmp_path / "prior.pth")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["arch"] == "resnet50_dilated" and saved["encoder"] == "encoder_k"
    state = saved["state_dict"]
    assert not [k for k in state if re.search(r"head|fc\.|queue|encoder", k)]
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}

    target = Backbone("resnet50_dilated", levels=[4], weights=str(path), frozen=True)
    own = target.body.state_dict()
    assert set(own) == set(state)  # nothing missing, nothing extra
    key_state = model.encoder_k.backbone.body.state_dict()
    assert all(torch.equal(own[k], key_state[k]) for k in own)  # the key (momentum) encoder

    query = torch.load(export_prior_extractor(model, tmp_path / "q.pth", encoder="query"), weights_only=True)
    assert torch.equal(query["state_dict"]["conv1.weight"], model.encoder_q.backbone.body.conv1.weight)

    if importlib.util.find_spec("fewshotseg.methods.qgnet") is None:
        return
    cfg = compose_config("train", [
        "method=qgnet", "backbone=resnet18", "method.model.prior_extractor.init=weights",
        f"method.model.prior_extractor.weights={path}",
    ])  # fmt: skip
    qgnet = instantiate(cfg.method.model)
    loaded = qgnet.prior_extractor.body.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------
# DDP helpers (2 gloo processes)
# ------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different draws per rank: the broadcast permutation must win
    x = torch.arange(4.0) + 10 * rank
    regions = x.long()[:, None] * 100
    (xs, rs), unshuffle = shuffle_across_ranks(x, regions)
    assert torch.equal(rs[:, 0], xs.long() * 100)  # images and their maps travel together
    result = (concat_all_gather(x).tolist(), xs.tolist(), unshuffle_across_ranks(xs * 2, unshuffle).tolist())
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_shuffle_bn_and_gather_across_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children need no re-import of this module (spawn would take a minute here)
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    gathered = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
    assert results[0][0] == results[1][0] == gathered
    assert sorted(results[0][1] + results[1][1]) == gathered  # a permutation of the global batch
    assert results[0][1] + results[1][1] != gathered  # (for these seeds) actually shuffled
    assert results[0][2] == [2 * v for v in gathered[:4]] and results[1][2] == [2 * v for v in gathered[4:]]


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_checkpoints_exports_and_resumes(tmp_path, data_dir):
    args = [*PRETRAIN_TINY, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", "seed=1"]
    proc = run_cli("fewshotseg.pretrain", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "logs" / "pretrain" / "runs").iterdir())
    export = run / "prior_extractor.pth"
    assert f"exported to {export}" in proc.stdout
    speed = float(re.search(r"throughput: ([\d.]+) images/s", proc.stdout).group(1))
    assert speed > 0
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_local" in metrics and "train/images_per_s" in metrics
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2

    # export=<checkpoint> gives the same file as the run's own export
    again = export_from_checkpoint(last, tmp_path / "again.pth")
    a, b = torch.load(export, weights_only=True), torch.load(again, weights_only=True)
    assert a["arch"] == b["arch"] == "resnet18" and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

    # resume: two more steps, with the queue and its pointer restored
    cfg = compose_pretrain_cfg(tmp_path / "resumed", data_dir, ["trainer.max_epochs=2", f"ckpt_path={last}"])
    pretrain(cfg)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    assert resumed["state_dict"]["queue_ptr"].item() == (state["state_dict"]["queue_ptr"].item() + 8) % 16
    assert resumed["lr_schedulers"][0]["last_epoch"] == 4
    lrs = [g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]]
    assert lrs[0] == pytest.approx(0.03 * 4 / 256 * 0.5 * (1 + math.cos(math.pi * 4 / 4)), abs=1e-12)

    with pytest.raises(ConfigError, match="export="):
        export_from_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x.pth")
