"""results.json, written by `train` and `evaluate` and read by `report`: the run, how it was
obtained, the results per test seed and their summary; and the tables the entry points print."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def run_info(cfg: DictConfig) -> dict:
    """What names a run in a report: method, backbone, data, fold, shot, seed, protocol."""
    choices = dict(cfg.get("choices") or {})  # stored by the run builder; older checkpoints: the class names
    target = str(OmegaConf.select(cfg, "method.model._target_") or "")
    source = str(OmegaConf.select(cfg, "data.source._target_") or "")
    return {
        "method": choices.get("method") or target.rpartition(".")[0].rpartition(".")[2],
        "backbone": OmegaConf.select(cfg, "method.model.backbone.name") or choices.get("backbone") or "-",
        "data": choices.get("data") or source.rpartition(".")[0].rpartition(".")[2],
        "fold": OmegaConf.select(cfg, "data.fold"),
        "shot": OmegaConf.select(cfg, "data.shot"),
        "seed": cfg.get("seed"),
        "protocol": OmegaConf.select(cfg, "data.protocol"),
    }


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[int, dict]) -> dict:
    """Mean and std over the test seeds of every scalar metric (miou, fbiou and any a method adds,
    e.g. meta_miou) and of each class's IoU."""
    results = list(runs.values())
    scalars = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {k: _mean_std([float(r[k]) for r in results]) for k in scalars if all(k in r for r in results)}
    classes = list(results[0].get("iou_per_class", {}))
    summary["iou_per_class"] = {
        c: _mean_std([r["iou_per_class"][c] for r in results if c in r["iou_per_class"]]) for c in classes
    }
    return summary


def write_results(path: str | Path, cfg: DictConfig | dict, runs: dict[int, dict], **source) -> dict:
    """results.json: the run (run_info of `cfg`, a run config such as `module.config`), how it was
    obtained (ckpt/weights), the results per test seed and their summary. The same file for `train`
    and `evaluate`; `report` reads it."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    record = {
        **{k: (str(v) if v is not None else None) for k, v in source.items()},
        "run": run_info(cfg),
        "runs": {int(k): v for k, v in runs.items()},
        "summary": summarise(runs),
    }
    Path(path).write_text(json.dumps(record, indent=2))
    return record


def format_test_results(results: dict, datamodule) -> str:
    """The lines `train` prints after testing on episodes: the episodes, each extra metric a method
    reports (`<name>_miou`), mIoU and FB-IoU."""
    dm = datamodule
    lines = [
        f"test episodes: {len(dm.test_set)} ({dm.source.name} fold {dm.fold}, {dm.shot}-shot, novel classes {dm.novel})"
    ]
    for key in sorted(k for k in results if k.endswith("_miou")):
        lines.append(f"test {key[: -len('_miou')]}-only mIoU: {100 * results[key]:.2f}")
    lines.append(f"test mIoU:   {100 * results['miou']:.2f}")
    lines.append(f"test FB-IoU: {100 * results['fbiou']:.2f}")
    return "\n".join(lines)


def format_table(runs: dict[int, dict], summary: dict, datamodule) -> str:
    """The table `evaluate` prints: IoU per class and seed, then mIoU, FB-IoU and any metric a
    method adds, each with its mean +- std over the seeds."""
    seeds = list(runs)
    width = max([len(c) for c in summary["iou_per_class"]] + [8]) + 2
    head = f"{'class':<{width}}" + "".join(f"seed {s:<6}" for s in seeds) + "mean +- std"
    dm = datamodule
    lines = [f"{dm.source.name} fold {dm.fold}, {getattr(dm, 'shot', '-')}-shot, "
             f"{len(dm.test_set)} episodes per seed", head]  # fmt: skip
    rows = [
        (c, [runs[s]["iou_per_class"].get(c, float("nan")) for s in seeds], summary["iou_per_class"][c])
        for c in summary["iou_per_class"]
    ]
    names = {"miou": "mIoU", "fbiou": "FB-IoU"}
    rows += [  # mIoU, FB-IoU, then any metric a method adds (e.g. meta_miou)
        (names.get(k, k), [runs[s][k] for s in seeds], summary[k])
        for k in sorted((k for k in summary if k != "iou_per_class"), key=lambda k: (k not in names, k))
    ]
    for name, values, ms in rows:
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{100 * v:<11.2f}" for v in values)
            + f"{100 * ms['mean']:.2f} +- {100 * ms['std']:.2f}"
        )
    return "\n".join(lines)
