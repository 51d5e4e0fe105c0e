"""Evaluation with feature reuse off and on (issue 18): an `evaluate`-style loop (one module, one
Trainer, 5 seeds of N fixed test episodes each, the seeds sharing the cache) on a generated
PASCAL-layout fold (tests/helpers/sources.py: 45 val images, fold 0 = 15 query images), for PANet
(vgg16_panet) and PFENet, ASGNet and Sym-Net (resnet50_psp), every backbone frozen with random
weights, the PFENet protocol (pad to `--eval-size`, scored at the label size). Off and on alternate
seed by seed in one process, so their ratio sees the same machine load; the metric states must be
identical (checked here too). Plus a PFENet training run with validation every epoch: the share
of the wall time spent validating, reuse off and on.

    python benchmarks/bench.py --only eval [--quick] [--eval-size 473] [--eval-episodes 45]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench import peak_rss_mib, section
from lightning import Callback, Trainer

from fewshotseg.runs import build_run

TESTS = Path(__file__).resolve().parents[1] / "tests"
METHODS = {
    "PANet": ["method=panet", "backbone=vgg16_panet"],
    "PFENet": ["method=pfenet"],
    "ASGNet": ["method=asgnet"],
    "Sym-Net": ["method=symnet", "method.model.base_learner=null", "method.model.freeze_backbone=true",
                "method.model.fallback_k=4"],
}  # fmt: skip
SEEDS = (0, 1, 2, 3, 4)


def _fixture(workdir: Path) -> tuple[Path, Path]:
    """The PASCAL-layout fold and a random class-name table (Sym-Net reads class names)."""
    sys.path.insert(0, str(TESTS))
    from helpers.sources import make_voc

    root = workdir / "VOC2012"
    if not root.is_dir():
        make_voc(root)
    table = workdir / "names.npy"
    t = np.random.default_rng(0).standard_normal((21, 8)).astype(np.float32)
    np.save(table, t / np.linalg.norm(t, axis=1, keepdims=True))
    return root, table


def _compose(root: Path, table: Path, workdir: Path, size: int, overrides: list[str]):
    sys.path.insert(0, str(TESTS))
    from helpers.configs import compose_config

    base = [
        "data=pascal", f"data.root={root}", f"data.protocols.pfenet.size={size}", "data.num_workers=0",
        "backbone.frozen=true", "backbone.weights=null", "~callbacks.progress_bar", f"paths.log_dir={workdir}",
        *overrides,
    ]  # fmt: skip
    if "method=symnet" in overrides:
        base.append(f"method.model.text_table={table}")
    return compose_config("train", base, output_dir=workdir)


class _States(Callback):
    def __init__(self):
        self.states = []

    def on_test_epoch_end(self, trainer, module):
        iou = module.test_iou
        self.states.append(
            torch.cat([iou.intersection, iou.union, iou.fb_intersection, iou.fb_union]).clone()
        )


def _evaluate(datamodule, module, device) -> tuple[dict, dict]:
    """Wall seconds and each seed's metric states of the 5-seed test loops (as `evaluate` runs them),
    reuse off and on. Off and on alternate seed by seed, so both see the same machine load; the on
    runs share one cache across seeds, as one `evaluate` call does."""
    keep = {False: _States(), True: _States()}
    trainers = {reuse: Trainer(accelerator=device.type, devices=1, logger=False, callbacks=[keep[reuse]],
                               enable_progress_bar=False, enable_model_summary=False)
                for reuse in (False, True)}  # fmt: skip
    module.set_feature_reuse({"enabled": True})
    cache, wall = module.feature_cache, {False: 0.0, True: 0.0}
    for seed in SEEDS:
        datamodule.test_seed = seed
        for reuse in (False, True):
            module.feature_cache = cache if reuse else None
            start = time.perf_counter()
            trainers[reuse].test(module, datamodule=datamodule, verbose=False)
            wall[reuse] += time.perf_counter() - start
    module.feature_cache = cache
    return wall, {reuse: k.states for reuse, k in keep.items()}


@section("eval")
def evaluation(args) -> list[dict]:
    size = getattr(args, "eval_size", None) or (73 if args.quick else 121)
    episodes = getattr(args, "eval_episodes", None) or (6 if args.quick else 45)
    batch = 4
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    root, table = _fixture(workdir)
    rows = []
    for method, overrides in METHODS.items():
        cfg = _compose(root, table, workdir / method, size,
                       [*overrides, f"data.num_test_episodes={episodes}", f"data.test_batch_size={batch}"])  # fmt: skip
        torch.manual_seed(0)
        datamodule, module = build_run(cfg)
        tag = f"{method} ({cfg.backbone.name}, {size} px, 1-shot, {len(SEEDS)} seeds x {episodes}, batch {batch})"
        wall, states = _evaluate(datamodule, module, args.device)
        for reuse in (False, True):
            n = len(SEEDS) * episodes
            rows.append({"name": f"{tag}, reuse {'on' if reuse else 'off'}", "value": n / wall[reuse],
                         "unit": "episodes/s", "wall_s": wall[reuse]})  # fmt: skip
            print(f"    {rows[-1]['name']}: {wall[reuse]:.1f} s", flush=True)  # survives an interrupted run
        cache = module.feature_cache
        same = all(torch.equal(a, b) for a, b in zip(states[False], states[True], strict=True))
        rows += [
            {"name": f"  {method} speed-up, reuse on / off", "value": wall[False] / wall[True], "unit": "x"},
            {"name": f"  {method} hit rate", "value": 100 * cache.hit_rate, "unit": "%"},
            {"name": f"  {method} cache peak", "value": cache.peak_bytes / 2**20, "unit": "MiB"},
            {"name": f"  {method} metric states identical", "value": float(same), "unit": "(1 = yes)"},
        ]
        print(f"    {method}: {module.feature_reuse_summary()}", flush=True)
    rows.append({"name": "process peak RSS", "value": peak_rss_mib(), "unit": "MiB"})
    rows += _validation_share(root, table, workdir, size, args)
    return rows


class _ValidationClock(Callback):
    def __init__(self):
        self.seconds = 0.0

    def on_validation_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, module):
        self.seconds += time.perf_counter() - self._start


def _validation_share(root, table, workdir, size, args) -> list[dict]:
    """PFENet trained for `epochs` short epochs, validating after each, reuse off and on."""
    epochs, steps = (2, 1) if args.quick else (4, 4)
    rows = []
    for reuse in (False, True):
        cfg = _compose(root, table, workdir / f"train_{reuse}", size, ["method=pfenet", "data.num_val_episodes=30",
                       f"feature_reuse.enabled={str(reuse).lower()}", "data.test_batch_size=4"])  # fmt: skip
        torch.manual_seed(0)
        datamodule, module = build_run(cfg)
        clock = _ValidationClock()
        trainer = Trainer(accelerator=args.device.type, devices=1, logger=False, callbacks=[clock],
                          max_epochs=epochs, limit_train_batches=steps, num_sanity_val_steps=0,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        wall = time.perf_counter() - start
        tag = f"PFENet training, {epochs} epochs x {steps} steps, validation (30 episodes) each epoch, reuse {'on' if reuse else 'off'}"
        rows += [
            {"name": f"{tag}: wall", "value": wall, "unit": "s"},
            {"name": f"  validation share of the wall time, reuse {'on' if reuse else 'off'}",
             "value": 100 * clock.seconds / wall, "unit": "%"},
        ]  # fmt: skip
    return rows
