"""Test a checkpoint on the fold's fixed novel-class episodes, optionally over several seeds.

    python -m fewshotseg.evaluate ckpt=logs/train/runs/<run>/checkpoints/best-epoch009.ckpt
    python -m fewshotseg.evaluate ckpt=... seeds=[0,1,2,3,4] data.root=/datasets/VOC2012
    python -m fewshotseg.evaluate method=asgnet data=pascal fold=0 shot=1 weights=<authors' file>

`ckpt=` rebuilds the run from the config stored in the checkpoint (data.*, protocol=, fold=, shot=
given here override the stored ones). `weights=` evaluates the authors' released checkpoint: the
run is composed as `train` would compose it and the file is mapped onto the method by its module's
`convert_official_state`. Prints IoU per class and seed, then mIoU and FB-IoU as mean +- std over
the seeds, and writes them to results.json in the run folder (the format `train` writes too).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshotseg import checkpoints
from fewshotseg.cli import (  # noqa: F401 - summarise re-exported
    CONFIG_DIR,
    build_run,
    load_official_weights,
    summarise,
    user_errors,
    write_results,
)
from fewshotseg.errors import ConfigError
from fewshotseg.methods.symnet import BASE_LEARNER_IN_STATE_DICT

# Config groups that a checkpoint fixes: choosing them next to ckpt= is an error, not a silent no-op.
_FIXED_BY_CKPT = ("method", "data", "backbone", "preset", "experiment")


def load_run(ckpt_path: str, overrides: DictConfig):
    """The module (with the checkpoint's weights) and datamodule of a training run. `overrides`:
    data.* keys that replace the stored ones, num_test_episodes, eval_resolution (null: as stored)."""
    ckpt = checkpoints.read(ckpt_path, "ckpt", "no such checkpoint file")
    if not isinstance(ckpt, dict) or "fewshotseg_config" not in ckpt:
        raise ConfigError(f"ckpt={ckpt_path} was not written by fewshotseg.train (no stored run config)")
    cfg = OmegaConf.create(ckpt["fewshotseg_config"])
    cfg.choices = cfg.get("choices") or {}  # older checkpoints: never the evaluating app's choices
    cfg.method.model.backbone.pretrained = False  # the weights come from the checkpoint
    cfg.method.model.backbone.weights = None
    extractor = cfg.method.model.get("prior_extractor")  # QGNet: the checkpoint holds it too
    if extractor is not None and extractor.get("init", "weights") == "weights":
        extractor.init = "random"
    if cfg.method.model.get("base_learner") is not None:  # Sym-Net: the checkpoint holds it too
        cfg.method.model.base_learner = BASE_LEARNER_IN_STATE_DICT
    given = {k: v for k, v in (overrides.get("data") or {}).items() if v is not None}
    cfg.data = OmegaConf.merge(cfg.data, given)
    if overrides.get("num_test_episodes"):
        cfg.data.num_test_episodes = overrides.num_test_episodes
    if overrides.get("eval_resolution"):
        cfg.eval_resolution = overrides.eval_resolution
    datamodule, module = build_run(cfg)
    module.load_state_dict(ckpt["state_dict"])
    return cfg, datamodule, module


def load_released(cfg: DictConfig):
    """The run `cfg` composes (as `train` would), with the authors' weights in `cfg.weights`."""
    cfg = cfg.copy()
    with open_dict(cfg):
        backbone = cfg.method.model.get("backbone")
        if backbone is not None:  # the released file holds the backbone too: nothing to download
            backbone.pretrained, backbone.weights = False, None
        if cfg.get("num_test_episodes"):
            cfg.data.num_test_episodes = cfg.num_test_episodes
    datamodule, module = build_run(cfg)
    load_official_weights(module, cfg, cfg.weights)
    return cfg, datamodule, module


def command_line_overrides(cfg: DictConfig) -> DictConfig:
    """The data settings the user gave on the command line (data.*, protocol=, fold=, shot=), for
    ckpt= runs; everything else in `cfg.data` is only the composed default."""
    out = OmegaConf.create({"data": {}})
    if not HydraConfig.initialized():
        return out
    hydra_cfg = HydraConfig.get()
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in _FIXED_BY_CKPT:
            raise ConfigError(
                f"{key}= cannot be combined with ckpt=: the checkpoint fixes the method, data and backbone "
                "(data.* keys, protocol=, fold= and shot= override single settings)"
            )
        if key.startswith("data.") and not override.is_delete():
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
        elif key in ("fold", "shot"):
            out.data[key] = cfg[key]
    if hydra_cfg.runtime.choices.get("protocol"):
        out.data.protocol = cfg.data.protocol
    return out


def load_model(cfg: DictConfig):
    """(run config, datamodule, module) from `ckpt=` (ours) or `weights=` (the authors'), exactly one."""
    if bool(cfg.get("ckpt")) == bool(cfg.get("weights")):
        raise ConfigError(
            "give ckpt=<a fewshotseg checkpoint> or method=<m> data=<d> fold=<f> shot=<k> weights=<the authors' "
            "file>, not both"
            if cfg.get("ckpt")
            else "no model: give ckpt=<a fewshotseg checkpoint> or method=<m> ... weights=<the authors' file>"
        )
    if cfg.ckpt:
        overrides = command_line_overrides(cfg)
        overrides.num_test_episodes = cfg.get("num_test_episodes")
        overrides.eval_resolution = cfg.get("eval_resolution")
        return load_run(cfg.ckpt, overrides)
    return load_released(cfg)


def evaluate(cfg: DictConfig) -> dict:
    run_cfg, datamodule, module = load_model(cfg)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
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
    write_results(out, OmegaConf.create(module.config), runs, ckpt=cfg.ckpt, weights=cfg.weights)
    print(f"results written to {out}")
    return summary


def format_table(runs: dict[int, dict], summary: dict, datamodule) -> str:
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return evaluate(cfg).get("miou", {}).get("mean")


if __name__ == "__main__":
    main()
