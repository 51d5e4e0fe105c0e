"""results.json, written by `train` and `evaluate` and read by `report`: the run, how it was
obtained, the results per test seed and their summary; and the tables the entry points print."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def run_info(cfg: DictConfig) -> dict:
    """What names a run in a report: method, backbone, data, fold, shot, seed, protocol, and the
    dataset's number of folds."""
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
        "num_folds": OmegaConf.select(cfg, "data.num_folds"),  # the dataset's: a mean over fewer is marked
    }


# What changes a number, recorded with every result; `report` groups runs by these.
HOW_FIELDS = (
    "protocol",  # the protocol table entry (data.protocol), or null: the dataset's own settings
    "test_split",  # the images the test episodes come from
    "test_input",  # how a test image is resized (e.g. squash to 400 x 400, longer side to 473)
    "scored_at",  # input (the network's input size) | original (the label's own size)
    "episodes",  # test episodes per seed
    "test_order",  # image | pair | class: how the test queries are drawn
    "fold_split",  # consecutive | interleaved (COCO-20i)
    "test_seeds",  # the seeds of the test episode lists
    "selection",  # which checkpoint was tested and on what it was selected
    "training",  # the training budget: epochs or steps and the batch; none; or the authors'
    "novel_images_in_train",  # excluded (BAM) | kept as background (PFENet, HSNet, PANet)
    "backbone_training",  # where the backbone's weights started, frozen or trained, its BN mode
    "class_name_table",  # the class-name embedding table a method reads, or null
    "precision",  # Lightning's precision of the test (32-true, bf16-mixed, ...)
)
SELECTIONS = {  # data/_episodes.yaml's `selection` -> what results.json says
    "held_out": "best validation mIoU on held-out episodes",
    "test_episodes": "best validation mIoU on the test episodes themselves (the authors' selection: optimistic)",
    "last": "the final weights, no selection",
}


def how_obtained(
    module, datamodule, trainer, seeds: list[int], selection: str, released: bool = False
) -> dict:
    """The HOW_FIELDS of a test: read from the objects that ran it, not from the config (the
    training budget excepted: the run's config, stored with its weights). `released`: the authors'
    weights, trained on their schedule."""
    model = getattr(module, "method", None)  # the method network (FewShotSegModule.method)
    return {
        "protocol": getattr(datamodule, "protocol", None),
        "test_split": getattr(datamodule, "test_split", None),
        "test_input": getattr(datamodule.test_transform, "description", "custom transform"),
        "scored_at": module.resolved_eval_resolution()
        if hasattr(module, "resolved_eval_resolution")
        else "input",
        "episodes": len(datamodule.test_set),
        "test_order": getattr(datamodule, "test_order", None),
        "fold_split": getattr(datamodule, "fold_split", None),
        "test_seeds": [int(s) for s in seeds],
        "selection": selection,
        "training": "the authors' schedule" if released else training_budget(module),
        "novel_images_in_train": "excluded" if datamodule.exclude_novel_in_train else "kept as background",
        "backbone_training": getattr(getattr(model, "backbone", None), "training_regime", None),
        "class_name_table": getattr(model, "class_name_table", None),
        "precision": str(trainer.precision),
    }


def training_budget(module) -> str:
    """The `training` field: the run's budget as its config set it (epochs or steps, the batch per
    device, the devices and any per-epoch limit), or none when nothing was trained."""
    if not getattr(module, "config", None):
        return "unrecorded"  # a module built outside a run: no config to read the budget from
    config = OmegaConf.create(module.config)

    def setting(key):
        value = OmegaConf.select(config, key)
        return None if value in (None, -1) else value  # -1: Lightning's "unlimited"

    epochs, steps = setting("trainer.max_epochs"), setting("trainer.max_steps")
    if 0 in (epochs, steps) or not any(p.requires_grad for p in module.parameters()):
        return "none"  # one value, so the untrained rows and the baselines share a table
    if epochs is None and steps is None:
        epochs = 1000  # Lightning's default when neither is set
    counts = ((steps, "step"), (epochs, "epoch"))
    budget = " or ".join(f"{n} {unit}{'s' * (n != 1)}" for n, unit in counts if n is not None)
    budget += f", batch {setting('data.batch_size')}"
    if isinstance(devices := setting("trainer.devices"), int) and devices > 1:
        budget += f" x {devices} devices"
    if (limit := setting("trainer.limit_train_batches")) not in (None, 1.0):
        budget += f", {limit} batches per epoch"
    return budget


def selection_of(choice: str | None, ckpt: str | None, weights: str | None = None) -> str:
    """The `selection` field: how the tested weights were chosen."""
    if weights:
        return "the authors' released weights"
    if choice not in SELECTIONS:
        return f"unrecorded (checkpoint {ckpt})" if ckpt else "unrecorded"
    return (
        SELECTIONS[choice]
        if ckpt or choice == "last"
        else f"{SELECTIONS[choice]} (no checkpoint: the final weights)"
    )


def spread(values: list[float]) -> dict:
    """Mean, sample std (n - 1; 0 for one value), best and worst over test seeds, and their count:
    BAM and HDMNet print the mean and the best seed, papers rarely say which one they report."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "best": max(values),
        "worst": min(values),
        "n": len(values),
    }


def summarise(runs: dict[int, dict]) -> dict:
    """Mean, std, best and worst over the test seeds of every scalar metric (miou, fbiou and any a
    method adds, e.g. meta_miou) and of each class's IoU; `best_seed`: the seed of the best mIoU."""
    results = list(runs.values())
    scalars = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {k: spread([float(r[k]) for r in results]) for k in scalars if all(k in r for r in results)}
    classes = list(results[0].get("iou_per_class", {}))
    summary["iou_per_class"] = {
        c: spread([r["iou_per_class"][c] for r in results if c in r["iou_per_class"]]) for c in classes
    }
    if "miou" in summary:
        summary["best_seed"] = max(runs, key=lambda s: runs[s]["miou"])
    return summary


def write_results(path: str | Path, cfg: DictConfig | dict, runs: dict[int, dict], how: dict | None = None,
                  **source) -> dict:  # fmt: skip
    """results.json: the run (run_info of `cfg`, a run config such as `module.config`), how it was
    obtained (ckpt/weights, and `how`: the HOW_FIELDS), the results per test seed and their summary.
    The same file for `train` and `evaluate`; `report` reads it."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    record = {
        **{k: (str(v) if v is not None else None) for k, v in source.items()},
        "run": run_info(cfg),
        "how": how or {},
        "runs": {int(k): v for k, v in runs.items()},
        "summary": summarise(runs),
    }
    Path(path).write_text(json.dumps(record, indent=2))
    return record


def format_test_results(results: dict, datamodule, episodes: int | None = None) -> str:
    """The lines `train` prints after testing on episodes: the episodes scored (`episodes`; null:
    the whole list), each extra metric a method reports (`<name>_miou`), mIoU and FB-IoU."""
    dm = datamodule
    listed = len(dm.test_set)
    count = listed if episodes is None or episodes == listed else f"{episodes} of the list's {listed}"
    lines = [
        f"test episodes: {count} ({dm.source.name} fold {dm.fold}, {dm.shot}-shot, novel classes {dm.novel})"
    ]
    for key in sorted(k for k in results if k.endswith("_miou")):
        lines.append(f"test {key[: -len('_miou')]}-only mIoU: {100 * results[key]:.2f}")
    lines.append(f"test mIoU:   {100 * results['miou']:.2f}")
    lines.append(f"test FB-IoU: {100 * results['fbiou']:.2f}")
    return "\n".join(lines)


def format_table(runs: dict[int, dict], summary: dict, datamodule) -> str:
    """The table `evaluate` prints: IoU per class and seed, then mIoU, FB-IoU and any metric a
    method adds, each with its mean +- sample std and its best over the seeds."""
    seeds = list(runs)
    width = max([len(c) for c in summary["iou_per_class"]] + [8]) + 2
    head = f"{'class':<{width}}" + "".join(f"seed {s:<6}" for s in seeds) + f"{'mean +- std':<18}best"
    dm = datamodule
    lines = [f"{dm.source.name} fold {dm.fold}, {getattr(dm, 'shot', '-')}-shot, "
             f"{len(dm.test_set)} episodes per seed", head]  # fmt: skip
    rows = [
        (c, [runs[s]["iou_per_class"].get(c, float("nan")) for s in seeds], summary["iou_per_class"][c])
        for c in summary["iou_per_class"]
    ]
    names = {"miou": "mIoU", "fbiou": "FB-IoU"}
    metrics = [k for k in summary if isinstance(summary[k], dict) and "mean" in summary[k]]
    rows += [  # mIoU, FB-IoU, then any metric a method adds (e.g. meta_miou)
        (names.get(k, k), [runs[s][k] for s in seeds], summary[k])
        for k in sorted(metrics, key=lambda k: (k not in names, k))
    ]
    for name, values, ms in rows:
        mean_std = f"{100 * ms['mean']:.2f} +- {100 * ms['std']:.2f}"
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{100 * v:<11.2f}" for v in values)
            + f"{mean_std:<18}{100 * ms['best']:.2f}"
        )
    if len(seeds) > 1 and "miou" in summary:
        m = summary["miou"]
        lines.append(
            f"mIoU over {len(seeds)} test seeds: mean {100 * m['mean']:.2f} (sample std {100 * m['std']:.2f}, "
            f"range {100 * m['worst']:.2f}-{100 * m['best']:.2f}); best seed {summary['best_seed']}: {100 * m['best']:.2f}"
        )
    return "\n".join(lines)
