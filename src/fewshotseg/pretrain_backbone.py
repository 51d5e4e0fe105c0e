"""Pre-train a backbone on the synthetic corpus, the built-in benchmark's ImageNet (docs/pretraining.md).

python -m fewshotseg.pretrain_backbone                          # ResNet-18, OS 8 -> data/backbones/resnet18_synthetic.pth
python -m fewshotseg.pretrain_backbone backbone.name=convnext_atto   # any timm name
python -m fewshotseg.pretrain_backbone corpus.generation.exclude_fold=0   # strict: without fold 0's novel classes
python -m fewshotseg.pretrain_backbone ckpt_path=logs/pretrain_backbone/runs/<run>/checkpoints/last.ckpt  # resume

Then `python -m fewshotseg.train method=<m> backbone=resnet18_synthetic` trains a method on it, frozen.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshotseg.backbone_pretraining import export_backbone, read_metadata
from fewshotseg.cli import hydra_main, instantiate_group, user_errors
from fewshotseg.errors import ConfigError


def settings(cfg: DictConfig) -> dict:
    """Everything that changes the weights: a second run with the same settings reuses the file."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return {
        "backbone": {
            k: v
            for k, v in backbone.items()
            if k not in ("_target_", "_partial_", "channels_last", "weights_from")
        },
        "corpus": OmegaConf.to_container(cfg.corpus.generation, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "batch_size": cfg.corpus.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "limit_train_batches": cfg.trainer.get("limit_train_batches"),
        "seed": cfg.seed,
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def pretrain_backbone(cfg: DictConfig) -> Path:
    output, wanted = Path(cfg.output).expanduser(), settings(cfg)
    if output.is_file() and not cfg.ckpt_path and not cfg.overwrite:
        meta = read_metadata(output) or {}
        if meta.get("settings") == wanted:
            acc = meta.get("accuracy", {})
            print(f"{output} exists with these settings: reused (sha256 {meta.get('sha256', '?')}, category "
                  f"accuracy {100 * acc.get('category_acc', float('nan')):.1f} %); overwrite=true trains again")  # fmt: skip
            return output
        changed = _differences(meta.get("settings", {}), wanted) if meta else ["(no <output>.json)"]
        raise ConfigError(
            f"output={output}: exists with other settings ({', '.join(changed[:4])}): give another "
            "output=<file>, or overwrite=true to replace it"
        )
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file to resume from")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.corpus)
    start = time.perf_counter()
    datamodule.prepare_data()  # the corpus, once (its own log line when it is generated)
    generated = time.perf_counter() - start
    module = instantiate(cfg.model)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_group(cfg.get("callbacks"))
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    if not trainer.is_global_zero:
        return output
    accuracy = module.val_results
    meta = {
        "settings": wanted,
        "accuracy": accuracy,
        "seconds": {"corpus": round(generated, 1), "total": round(time.perf_counter() - start, 1)},
        "run": str(cfg.paths.output_dir),
    }
    meta = export_backbone(module.method, output, meta)
    pct = {k: f"{100 * v:.1f} %" for k, v in accuracy.items()}
    print(f"corpus val accuracy (pixels): category {pct.get('category_acc')} of object pixels (shape "
          f"{pct.get('shape_acc')}, texture {pct.get('texture_acc')}, colour {pct.get('colour_acc')}), "
          f"background {pct.get('background_acc')}")  # fmt: skip
    print(
        f"backbone written to {output} (sha256 {meta['sha256']}, {meta['seconds']['total']:.0f} s); "
        f"use it with backbone.weights={output}"
    )
    return output


@hydra_main("pretrain_backbone")
def main(cfg: DictConfig) -> None:
    with user_errors():
        pretrain_backbone(cfg)


if __name__ == "__main__":
    main()
