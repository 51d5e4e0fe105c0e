"""The built-in synthetic benchmark (data=synthetic): generated once from a seed, then read from disk
in the PASCAL VOC layout by the same reader as PASCAL-5i.

Where it is generated: at its default location (`default_root`, under paths.data_dir) by itself;
at any other `data.root` only when asked (`generate=true`), so that a mistyped data.root is an
error instead of a new 25 MB dataset at the typo's path."""

from __future__ import annotations

from pathlib import Path

from fewshotseg.data.sources.pascal import VOCLayoutSource
from fewshotseg.data.sources.synthetic_gen import SYNTHETIC_CLASSES, generate_synthetic
from fewshotseg.errors import DataError


class SyntheticSource(VOCLayoutSource):
    def __init__(
        self,
        root: str | Path,
        seed: int = 0,
        num_train: int = 1000,
        num_val: int = 500,
        image_size: int = 128,
        generate: bool | None = True,
        default_root: str | Path | None = None,
    ):
        super().__init__(
            root, list(SYNTHETIC_CLASSES), {"train": "train.txt", "val": "val.txt"}, name="synthetic"
        )
        self.generation = dict(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
        # generate: true (generate wherever root is), false (never), null (only at default_root)
        self.generate, self.default_root = generate, default_root

    def _may_generate(self) -> bool:
        if self.generate is not None:
            return bool(self.generate)
        at = Path(self.root).expanduser().absolute()
        return self.default_root is not None and at == Path(self.default_root).expanduser().absolute()

    def prepare(self) -> None:
        if not (Path(self.root) / "synthetic.json").is_file() and not self._may_generate():
            raise DataError(
                f"data.root={self.root}: no synthetic benchmark there; data.source.generate=true generates "
                f"one there (only the default location {self.default_root} generates by itself)"
            )
        generate_synthetic(self.root, **self.generation)
        super().prepare()
