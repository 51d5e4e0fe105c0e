"""OmegaConf resolvers used by the configs (registered when the package is imported)."""

from __future__ import annotations

from omegaconf import OmegaConf


def crop_for(image_size: int, fraction: float = 0.885) -> int:
    """The largest 8k + 1 <= fraction * image_size: a crop whose stride-8 feature grid is exact
    ((H - 1) % 8 == 0, as ASGNet asks). 128 -> 113 (the default), 256 -> 225."""
    return int((fraction * int(image_size) - 1) // 8) * 8 + 1


def synthetic_dir(image_size: int) -> str:
    """`synthetic` for the default 128 px benchmark, `synthetic_<size>` for other sizes, so that
    both can be used side by side (each is generated once into its own folder)."""
    return "synthetic" if int(image_size) == 128 else f"synthetic_{int(image_size)}"


OmegaConf.register_new_resolver("fss.crop", crop_for, replace=True)
OmegaConf.register_new_resolver("fss.synthetic_dir", synthetic_dir, replace=True)


def strict_suffix(exclude_fold) -> str:
    """`_strict<k>` for a pre-training corpus (and backbone) without fold k's novel classes, else ''."""
    return "" if exclude_fold is None else f"_strict{int(exclude_fold)}"


OmegaConf.register_new_resolver("fss.strict_suffix", strict_suffix, replace=True)


def _register_run_folders() -> None:
    from fewshotseg.run_folders import hydra_subdir, run_dir

    # use_cache: one folder per launch, however often the config is read (Hydra copies the cache to sweep jobs)
    OmegaConf.register_new_resolver("fss.run_dir", run_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("fss.hydra_subdir", hydra_subdir, replace=True, use_cache=True)


_register_run_folders()
