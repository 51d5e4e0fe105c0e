"""Test a checkpoint on the fold's fixed novel-class episodes, optionally over several seeds.

    python -m fewshotseg.evaluate ckpt=logs/train/runs/<run>/checkpoints/best-epoch009.ckpt
    python -m fewshotseg.evaluate ckpt=... seeds=[0,1,2,3,4] data.root=/datasets/VOC2012
    python -m fewshotseg.evaluate method=asgnet data=pascal fold=0 shot=1 weights=<authors' file>

`ckpt=` rebuilds the run from the config stored in the checkpoint (data.*, protocol=, fold=, shot=
given here override the stored ones). `weights=` evaluates the authors' released checkpoint: the
run is composed as `train` would compose it and the file is mapped onto the method by the rename
table its contract declares (`official_names`, methods/base.py). Prints IoU per class and seed,
then mIoU and FB-IoU as mean +- sample std and best over the seeds, and writes them to results.json in the run
folder (the format `train` writes too). The seeds' lists are scored in one loop that visits them
grouped by query image, each seed into its own metric, so a frozen backbone runs about once per
image of the fold however small the feature cache (`feature_reuse`, docs/benchmarks.md; its hit
rate is printed).
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshotseg.cli import hydra_main, user_errors
from fewshotseg.results import format_table, how_obtained, selection_of, summarise, write_results
from fewshotseg.runs import load_model, load_run, seed_list  # noqa: F401 - load_run re-exported


def evaluate(cfg: DictConfig) -> dict:
    seeds = seed_list(cfg.seeds)  # checked before the model is built
    run_cfg, datamodule, module = load_model(cfg)
    module.set_feature_reuse(cfg.get("feature_reuse"))  # one cache for every seed of this call
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False)
    # every seed's list in one test loop, grouped by query image (data/eval_order.py), each seed
    # scored into its own metric: the same numbers as one loop per seed
    datamodule.test_seed, datamodule.test_seeds = int(seeds[0]), [int(s) for s in seeds]
    trainer.test(module, datamodule=datamodule, verbose=False)
    runs = dict(zip(datamodule.test_seeds, module.run_results, strict=True))
    print(module.feature_reuse_summary())  # per rank
    if not trainer.is_global_zero:
        return {}
    summary = summarise(runs)
    print(format_table(runs, summary, datamodule))
    out = Path(cfg.paths.output_dir) / "results.json"
    selection = selection_of((module.config or {}).get("selection"), cfg.ckpt, cfg.weights)
    how = how_obtained(module, datamodule, trainer, list(runs), selection, released=bool(cfg.weights))
    write_results(out, OmegaConf.create(module.config), runs, how, ckpt=cfg.ckpt, weights=cfg.weights)
    print(f"results written to {out}")
    return summary


@hydra_main("evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return evaluate(cfg).get("miou", {}).get("mean")


if __name__ == "__main__":
    main()
