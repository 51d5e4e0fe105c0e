"""Which classes are novel (test) and which are base (train) in each fold."""

from __future__ import annotations

from fewshotseg.errors import ConfigError


def fold_classes(num_classes: int, num_folds: int, fold: int, split: str = "consecutive") -> list[int]:
    """Novel class ids (1-based) of `fold`.

    consecutive: fold i = {i*n+1 .. i*n+n}, n = num_classes / num_folds (PASCAL-5i, PANet's COCO).
    interleaved: fold i = {num_folds*k + i + 1} (COCO-20i as in PFENet/ASGNet/HSNet).
    """
    if not 0 <= fold < num_folds:
        raise ConfigError(f"fold={fold} is out of range: expected an integer in 0..{num_folds - 1}")
    if num_classes % num_folds:
        raise ConfigError(f"{num_classes} classes cannot be split into {num_folds} equal folds")
    per_fold = num_classes // num_folds
    if split == "consecutive":
        return list(range(fold * per_fold + 1, (fold + 1) * per_fold + 1))
    if split == "interleaved":
        return [num_folds * k + fold + 1 for k in range(per_fold)]
    raise ConfigError(f"unknown fold split {split!r}: expected 'consecutive' or 'interleaved'")


def base_classes(num_classes: int, num_folds: int, fold: int, split: str = "consecutive") -> list[int]:
    novel = set(fold_classes(num_classes, num_folds, fold, split))
    return [c for c in range(1, num_classes + 1) if c not in novel]
