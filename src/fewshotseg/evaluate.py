"""Test a checkpoint on the fold's fixed novel-class episodes, optionally over several seeds.

    python -m fewshotseg.evaluate ckpt=logs/train/runs/<run>/checkpoints/best-epoch009.ckpt
    python -m fewshotseg.evaluate ckpt=... seeds=[0,1,2,3,4] data.root=/datasets/VOC2012

Prints IoU per class and seed, then mIoU and FB-IoU as mean +- std over the seeds, and writes
them to results.json in the run folder.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fewshotseg.cli import CONFIG_DIR, build, user_errors
from fewshotseg.errors import ConfigError


def load_run(ckpt_path: str, overrides: DictConfig):
    """The module (with the checkpoint's weights) and datamodule of a training run."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt={ckpt_path}: no such checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "fewshotseg_config" not in ckpt:
        raise ConfigError(f"ckpt={ckpt_path} was not written by fewshotseg.train (no stored run config)")
    cfg = OmegaConf.create(ckpt["fewshotseg_config"])
    cfg.method.model.backbone.pretrained = False  # the weights come from the checkpoint
    cfg.method.model.backbone.weights = None
    given = {k: v for k, v in (overrides.get("data") or {}).items() if v is not None}
    cfg.data = OmegaConf.merge(cfg.data, given)
    if overrides.get("num_test_episodes"):
        cfg.data.num_test_episodes = overrides.num_test_episodes
    if overrides.get("eval_resolution"):
        cfg.eval_resolution = overrides.eval_resolution
    datamodule, module = build(cfg)
    module.load_state_dict(ckpt["state_dict"])
    return cfg, datamodule, module


def evaluate(cfg: DictConfig) -> dict:
    run_cfg, datamodule, module = load_run(cfg.ckpt, cfg)
    trainer = L.Trainer(logger=False, callbacks=[], enable_model_summary=False, **cfg.trainer)
    runs = {}
    for seed in cfg.seeds:
        datamodule.test_seed = int(seed)
        trainer.test(module, datamodule=datamodule, verbose=False)
        runs[int(seed)] = module.test_results
    if not trainer.is_global_zero:
        return {}
    summary = summarise(runs)
    print(format_table(runs, summary, datamodule))
    out = Path(cfg.paths.output_dir) / "results.json"
    out.write_text(json.dumps({"ckpt": str(cfg.ckpt), "runs": runs, "summary": summary}, indent=2))
    print(f"results written to {out}")
    return summary


def summarise(runs: dict[int, dict]) -> dict:
    def mean_std(values: list[float]) -> dict:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        }

    classes = list(next(iter(runs.values()))["iou_per_class"])
    return {
        "miou": mean_std([r["miou"] for r in runs.values()]),
        "fbiou": mean_std([r["fbiou"] for r in runs.values()]),
        "iou_per_class": {c: mean_std([r["iou_per_class"][c] for r in runs.values()]) for c in classes},
    }


def format_table(runs: dict[int, dict], summary: dict, datamodule) -> str:
    seeds = list(runs)
    width = max(len(c) for c in summary["iou_per_class"]) + 2
    head = f"{'class':<{width}}" + "".join(f"seed {s:<6}" for s in seeds) + "mean +- std"
    lines = [f"{datamodule.source.name} fold {datamodule.fold}, {datamodule.shot}-shot, "
             f"{len(datamodule.test_set)} episodes per seed", head]  # fmt: skip
    rows = [
        (c, [runs[s]["iou_per_class"][c] for s in seeds], summary["iou_per_class"][c])
        for c in summary["iou_per_class"]
    ]
    rows += [
        ("mIoU", [runs[s]["miou"] for s in seeds], summary["miou"]),
        ("FB-IoU", [runs[s]["fbiou"] for s in seeds], summary["fbiou"]),
    ]
    for name, values, ms in rows:
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{100 * v:<11.2f}" for v in values)
            + f"{100 * ms['mean']:.2f} +- {100 * ms['std']:.2f}"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return evaluate(cfg).get("miou", {}).get("mean")


if __name__ == "__main__":
    main()
