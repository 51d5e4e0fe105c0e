"""Evaluation with feature reuse off and on (issue 18): an `evaluate`-style loop (one module, one
Trainer, 5 seeds of N fixed test episodes each, the seeds sharing the cache) on a generated
PASCAL-layout fold (tests/helpers/sources.py: 45 val images, fold 0 = 15 query images), for PANet
(vgg16_panet) and PFENet, ASGNet, Sym-Net, QGNet and DPNet (resnet50_psp), every backbone frozen with random
weights, the PFENet protocol (pad to `--eval-size`, scored at the label size). Off and on run one
after the other in one process (which first alternates by method), so their ratio sees the same
machine; the metric states must be identical (checked here too). Plus a PFENet training run with
validation every epoch: the share of the wall time spent validating, reuse off and on.

    python benchmarks/bench.py --only eval [--quick] [--eval-size 473] [--eval-episodes 45]
        [--eval-methods PFENet,QGNet] [--no-eval-training]
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
    "QGNet": ["method=qgnet", "method.model.prior_extractor.init=supervised_copy"],
    "DPNet": ["method=dpnet"],
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
    """Each seed's metric states at the end of the test loop (read before the module resets them)."""

    def __init__(self):
        self.states = []

    def on_test_epoch_end(self, trainer, module):
        for iou in module.run_iou:
            self.states.append(
                torch.cat([iou.intersection, iou.union, iou.fb_intersection, iou.fb_union]).clone()
            )


def _evaluate(datamodule, module, device, methods_seen: int) -> tuple[dict, dict]:
    """Wall seconds and each seed's metric states of `evaluate`'s test loop (the 5 seeds' lists in
    one loop, grouped by query image), reuse off and on. Which goes first alternates from method to
    method, so a drift of the machine's load does not favour one side."""
    keep = {False: _States(), True: _States()}
    wall = {}
    order = (False, True) if methods_seen % 2 == 0 else (True, False)
    for reuse in order:
        module.set_feature_reuse({"enabled": reuse})
        trainer = Trainer(accelerator=device.type, devices=1, logger=False, callbacks=[keep[reuse]],
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        datamodule.test_seeds = list(SEEDS)
        start = time.perf_counter()
        trainer.test(module, datamodule=datamodule, verbose=False)
        wall[reuse] = time.perf_counter() - start
        if reuse:
            cache = module.feature_cache
    module.feature_cache = cache  # the reuse-on run's, for its hit rate and peak
    return wall, {reuse: k.states for reuse, k in keep.items()}


@section("eval")
def evaluation(args) -> list[dict]:
    size = getattr(args, "eval_size", None) or (73 if args.quick else 121)
    episodes = getattr(args, "eval_episodes", None) or (6 if args.quick else 45)
    batch = 4
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    root, table = _fixture(workdir)
    rows = []
    wanted = [m for m in getattr(args, "eval_methods", "").split(",") if m] or list(METHODS)
    unknown = set(wanted) - set(METHODS)
    if unknown:
        raise SystemExit(f"--eval-methods: unknown {sorted(unknown)}: choose from {list(METHODS)}")
    for seen, method in enumerate(wanted):
        overrides = METHODS[method]
        cfg = _compose(root, table, workdir / method, size,
                       [*overrides, f"data.num_test_episodes={episodes}", f"data.test_batch_size={batch}"])  # fmt: skip
        torch.manual_seed(0)
        datamodule, module = build_run(cfg)
        tag = f"{method} ({cfg.backbone.name}, {size} px, 1-shot, {len(SEEDS)} seeds x {episodes}, batch {batch})"
        wall, states = _evaluate(datamodule, module, args.device, seen)
        cache = module.feature_cache
        for reuse in (False, True):
            n = len(SEEDS) * episodes
            rows.append({"name": f"{tag}, reuse {'on' if reuse else 'off'}", "value": n / wall[reuse],
                         "unit": "episodes/s", "wall_s": wall[reuse]})  # fmt: skip
            print(f"    {rows[-1]['name']}: {wall[reuse]:.1f} s", flush=True)  # survives an interrupted run
        same = len(states[False]) == len(SEEDS) and all(
            torch.equal(a, b) for a, b in zip(states[False], states[True], strict=True)
        )
        rows += [
            {"name": f"  {method} speed-up, reuse on / off", "value": wall[False] / wall[True], "unit": "x"},
            {"name": f"  {method} hit rate", "value": 100 * cache.hit_rate, "unit": "%"},
            {"name": f"  {method} cache peak", "value": cache.peak_bytes / 2**20, "unit": "MiB"},
            {"name": f"  {method} metric states identical", "value": float(same), "unit": "(1 = yes)"},
        ]
        print(f"    {method}: {module.feature_reuse_summary()}", flush=True)
    rows.append({"name": "process peak RSS", "value": peak_rss_mib(), "unit": "MiB"})
    if not getattr(args, "no_eval_training", False):
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
    """PFENet trained for `epochs` short epochs of `steps` steps (batch 4), validating on 20 episodes
    after each, reuse off and on. The frozen backbone's BatchNorms in eval mode (the papers' regime
    here, backbone=resnet18_synthetic): with the PFENet paper's bn_mode=train its statistics drift
    in training and each validation starts with an empty cache."""
    epochs, steps = (2, 1) if args.quick else (3, 2)
    rows = []
    for reuse in (False, True):
        cfg = _compose(root, table, workdir / f"train_{reuse}", size, ["method=pfenet", "data.num_val_episodes=20",
                       "backbone.bn_mode=eval", f"feature_reuse.enabled={str(reuse).lower()}",
                       "data.batch_size=4", "data.test_batch_size=4"])  # fmt: skip
        torch.manual_seed(0)
        datamodule, module = build_run(cfg)
        clock = _ValidationClock()
        trainer = Trainer(accelerator=args.device.type, devices=1, logger=False, callbacks=[clock],
                          max_epochs=epochs, limit_train_batches=steps, num_sanity_val_steps=0,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        wall = time.perf_counter() - start
        tag = (f"PFENet training ({size} px, bn_mode eval), {epochs} epochs x {steps} steps of 4, "
               f"validation (20 episodes) each epoch, reuse {'on' if reuse else 'off'}")  # fmt: skip
        rows += [
            {"name": f"{tag}: wall", "value": wall, "unit": "s"},
            {"name": f"  validation share of the wall time, reuse {'on' if reuse else 'off'}",
             "value": 100 * clock.seconds / wall, "unit": "%"},
            {"name": f"  validation seconds, reuse {'on' if reuse else 'off'}", "value": clock.seconds, "unit": "s"},
        ]  # fmt: skip
    return rows
