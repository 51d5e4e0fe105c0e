"""The built-in synthetic benchmark (data=synthetic): generated once from a seed, then read from disk
in the PASCAL VOC layout by the same reader as PASCAL-5i."""

from __future__ import annotations

from pathlib import Path

from fewshotseg.data.sources.pascal import VOCLayoutSource
from fewshotseg.data.sources.synthetic_gen import SYNTHETIC_CLASSES, generate_synthetic


class SyntheticSource(VOCLayoutSource):
    def __init__(
        self,
        root: str | Path,
        seed: int = 0,
        num_train: int = 1000,
        num_val: int = 500,
        image_size: int = 128,
    ):
        super().__init__(
            root, list(SYNTHETIC_CLASSES), {"train": "train.txt", "val": "val.txt"}, name="synthetic"
        )
        self.generation = dict(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)

    def prepare(self) -> None:
        generate_synthetic(self.root, **self.generation)
        super().prepare()
