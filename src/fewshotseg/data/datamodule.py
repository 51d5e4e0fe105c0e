"""FewShotDataModule: training episodes on the fold's base classes, fixed test episodes on its novel
classes.

task=semantic (BAM's base-learner stage, `method=pspnet_base` sets it): the same source, class
index, caches and transforms, but whole images with multi-class labels instead of episodes: every
image of the training split (BAM's `train_base.py` reads the whole list) and, for validation and
test, every image of the test split, labelled with the fold's base classes 1..Nb (novel classes ->
background, 255 kept; BAM's `get_mulway_base_data.py`). base_label=true (methods built on BAM) adds
the query's base-class label `query_base_label` to every episode, transformed with the query.

Evaluation protocol: `protocol` names an entry of `protocols` (the data config's table, see
conf/data/_episodes.yaml) that fills every setting left null here: the transforms (train
augment|resize, test pad|resize, size, scale), num_test_episodes, test_order, min_area, and the
eval_resolution the LightningModule reads. A setting given explicitly always wins over the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from fewshotseg.data.episode import collate_episodes
from fewshotseg.data.eval_order import QueryGroupedOrder
from fewshotseg.data.index import ClassIndex, load_class_index
from fewshotseg.data.sampling import (
    TRAIN_ORDERS,
    EpisodeSpec,
    draw_train_episode,
    images_per_class,
    load_or_create_episodes,
    pick_class,
    query_images,
    restrict_index,
    without_classes,
)
from fewshotseg.data.sources.base import SegmentationSource, base_labels, binarise  # noqa: F401 - binarise re-exported
from fewshotseg.data.train_order import ResumableLoader, TrainOrder, item_key, training_position
from fewshotseg.data.transforms import PairTransform, protocol_transforms
from fewshotseg.errors import ConfigError, DataError, integer

PROTOCOL_KEYS = (
    "train",
    "test",
    "size",
    "scale",
    "num_test_episodes",
    "test_order",
    "train_order",
    "min_area",
    "eval_resolution",
)
TEST_ORDERS = ("image", "pair", "class")
SELECTIONS = ("held_out", "test_episodes", "last")  # the top-level `selection` (conf/train.yaml)
TASKS = ("episodes", "semantic")


def resolve_protocol(protocol: str | None, protocols: Mapping | None) -> dict:
    """The settings table entry of `protocol` ({} for none), checked."""
    if protocol is None:
        return {}
    table = dict(protocols or {})
    if protocol not in table:
        raise ConfigError(
            f"data.protocol={protocol!r}: this dataset defines the protocols {sorted(table)} (data.protocols)"
        )
    settings = dict(table[protocol])
    unknown = set(settings) - set(PROTOCOL_KEYS)
    if unknown:
        raise ConfigError(
            f"data.protocols.{protocol} has unknown keys {sorted(unknown)}: expected {list(PROTOCOL_KEYS)}"
        )
    return settings


def _check_size(source: SegmentationSource, image_id: str, image: np.ndarray, label: np.ndarray) -> None:
    if image.shape[:2] != label.shape:
        raise DataError(
            f"{source.name} image {image_id!r} is {image.shape[:2]} but its label is {label.shape}"
        )


class _EpisodeReader(Dataset):
    def __init__(
        self, source: SegmentationSource, transform: PairTransform, shot: int, base: list[int] | None = None
    ):
        self.source, self.transform, self.shot = source, transform, shot
        self.base = base  # set: episodes carry the query's base-class label

    def _load(self, image_id: str, class_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(image, mask) transformed, and the binarised mask at original resolution."""
        image = self.source.load_image(image_id)
        mask = self.source.load_mask(image_id, class_id)
        _check_size(self.source, image_id, image, mask)
        return (*self.transform(image, mask), mask)

    def _load_query(self, image_id: str, class_id: int) -> tuple[torch.Tensor, ...]:
        """(image, mask[, base-class label]) transformed together, and the raw binarised mask."""
        if self.base is None:
            return self._load(image_id, class_id)
        image, label = self.source.load_image(image_id), self.source.load_label(image_id)
        _check_size(self.source, image_id, image, label)
        mask = binarise(label, class_id)
        img, q_mask, q_base = self.transform(image, mask, base_labels(label, self.base))
        return img, q_mask, mask, q_base

    def _episode(self, spec: EpisodeSpec, episode_idx: int) -> tuple[dict, np.ndarray]:
        q_img, q_mask, q_raw, *q_base = self._load_query(spec.query, spec.class_id)
        supports = [self._load(s, spec.class_id) for s in spec.supports]
        item = {
            "query_img": q_img,
            "query_mask": q_mask,
            "support_imgs": torch.stack([s[0] for s in supports]),
            "support_masks": torch.stack([s[1] for s in supports]),
            "class_id": spec.class_id,
            "episode_idx": episode_idx,
            "query_id": spec.query,
            "support_ids": list(spec.supports),
        }
        if q_base:
            item["query_base_label"] = q_base[0]
        return item, q_raw


class TrainEpisodes(_EpisodeReader):
    """One item per query image, drawn image-first (order="image", not class-balanced: the PFENet
    family) or class-first (order="class": PANet); an epoch has one item per query image either way."""

    def __init__(self, source, transform, shot, index: ClassIndex, classes: list[int], min_area: int = 0,
                 base: list[int] | None = None, order: str = "image"):  # fmt: skip
        super().__init__(source, transform, shot, base)
        self.index, self.order = index, order
        self.pools = images_per_class(index, classes, min_area)
        rng = np.random.default_rng(0)  # only asks whether some class of the query can be supported
        self.queries = [
            q for q in query_images(index, classes, min_area) if pick_class(rng, index[q], self.pools, q)
        ]
        if not self.queries:
            raise DataError(f"no training image of {source.name} contains the base classes {classes}")

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key) -> dict:
        i, rng = item_key(key)  # TrainOrder's (index, (seed, epoch, position)): resumable, any worker count
        self.transform.set_seed(int(rng.integers(2**31)))
        spec = draw_train_episode(rng, self.order, self.queries[i], self.index, self.pools, self.shot)
        return self._episode(spec, -1)[0]


class FixedEpisodes(_EpisodeReader):
    """The saved test episodes; also returns the query label for original-resolution scoring, in the
    test transform's frame (the raw label, or padded to a square for the PFENet resize).

    `runs`: several lists scored in one loop, each into its own metric (the seeds of one `evaluate`
    call, visited together grouped by query image: data/eval_order.py); item i then carries
    `test_run`, the list it belongs to, and keeps the position it has in that list."""

    def __init__(self, source, transform, shot, episodes: list[EpisodeSpec] | None = None,
                 base: list[int] | None = None, runs: list[list[EpisodeSpec]] | None = None):  # fmt: skip
        super().__init__(source, transform, shot, base)
        if (episodes is None) == (runs is None):
            raise ValueError("FixedEpisodes: give episodes or runs")
        runs = [episodes] if runs is None else runs
        self.episodes = [spec for run in runs for spec in run]
        self.num_runs = len(runs)
        self.places = [(r, p) for r, run in enumerate(runs) for p in range(len(run))]

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> dict:
        run, position = self.places[i]
        # seeded by position in its list: a random op added to a test pipeline stays reproducible
        self.transform.set_seed(position)
        item, q_raw = self._episode(self.episodes[i], position)
        item["query_mask_orig"] = torch.from_numpy(self.transform.original_frame(q_raw)).long()
        if self.num_runs > 1:
            item["test_run"] = run
        return item


class SemanticImages(Dataset):
    """Whole images with the fold's base-class labels (task=semantic): 0 background and novel
    classes, 1..Nb the base classes in ascending id order, 255 ignore. The training crop's redraw
    rule looks at label 1 (here the first base class), exactly as BAM's `Crop` does on these labels."""

    def __init__(self, source: SegmentationSource, transform: PairTransform, image_ids: list[str],
                 base: list[int], train: bool):  # fmt: skip
        self.source, self.transform, self.image_ids, self.base = source, transform, image_ids, base
        self.train = train

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key) -> dict:
        # Training: TrainOrder's (index, (seed, epoch, position)); evaluation: seeded by position.
        i, rng = item_key(key)
        self.transform.set_seed(int(rng.integers(2**31)) if self.train else i)
        image_id = self.image_ids[i]
        image, label = self.source.load_image(image_id), self.source.load_label(image_id)
        _check_size(self.source, image_id, image, label)
        img, target = self.transform(image, base_labels(label, self.base))
        return {"image": img, "label": target, "image_id": image_id}


class FewShotDataModule(LightningDataModule):
    def __init__(
        self,
        root: str,
        source: Callable[..., SegmentationSource],
        train_transform: PairTransform | None = None,
        test_transform: PairTransform | None = None,
        fold: int = 0,
        shot: int = 1,
        num_folds: int = 4,
        fold_split: str = "consecutive",
        train_split: str = "train",
        test_split: str = "val",
        min_area: int | None = None,
        batch_size: int = 8,
        test_batch_size: int = 8,
        num_workers: int = 2,
        num_val_episodes: int = 200,
        num_test_episodes: int | None = None,
        test_seed: int = 0,
        test_order: str | None = None,
        train_order: str | None = None,
        val_split: str | None = None,
        val_seed: int | None = None,
        selection: str = "held_out",
        exclude_novel_in_train: bool = False,
        protocol: str | None = None,
        protocols: Mapping | None = None,
        task: str = "episodes",
        base_label: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"data.task={task!r}: expected one of {list(TASKS)}")
        self.task, self.base_label = task, bool(base_label)
        self.seed = seed  # the training data order and augmentation (data/train_order.py)
        shot = integer(shot, "shot", "an integer >= 1 (support images per episode)")
        if shot < 1:
            raise ConfigError(f"shot={shot}: expected an integer >= 1 (support images per episode)")
        fold = integer(fold, "fold", f"an integer in 0..{num_folds - 1}")
        self.source = source(root=root)  # a partial: the config names the dataset, data.root the place
        self.protocol = protocol
        settings = resolve_protocol(protocol, protocols)
        self.fold, self.shot, self.fold_split = fold, shot, fold_split
        classes = self.source.class_split(fold, num_folds, fold_split)  # validates fold
        self.base, self.val_classes, self.novel = classes.train, classes.val, classes.test
        self.train_split, self.test_split = train_split, test_split
        self.val_split = val_split or test_split
        self.min_area = int(min_area if min_area is not None else settings.get("min_area", 0))
        self.exclude_novel_in_train = exclude_novel_in_train
        self.batch_size, self.test_batch_size, self.num_workers = batch_size, test_batch_size, num_workers
        self.num_val_episodes = num_val_episodes
        self.num_test_episodes = int(
            num_test_episodes if num_test_episodes is not None else settings.get("num_test_episodes", 1000)
        )
        self.test_seed = test_seed
        # several seeds' test lists scored in one loop, each into its own metric (`evaluate`)
        self.test_seeds: list[int] | None = None
        self.test_order = test_order if test_order is not None else settings.get("test_order", "image")
        if self.test_order not in TEST_ORDERS:
            raise ConfigError(f"data.test_order={self.test_order!r}: expected one of {list(TEST_ORDERS)}")
        self.train_order = train_order if train_order is not None else settings.get("train_order", "image")
        if self.train_order not in TRAIN_ORDERS:
            raise ConfigError(f"data.train_order={self.train_order!r}: expected one of {list(TRAIN_ORDERS)}")
        if selection not in SELECTIONS:
            raise ConfigError(f"selection={selection!r}: expected one of {list(SELECTIONS)}")
        self.selection, self.val_seed = selection, val_seed
        self.eval_resolution = settings.get("eval_resolution", "input")  # read by FewShotSegModule
        if train_transform is None or test_transform is None:
            if not settings:
                raise ConfigError("data.train_transform / data.test_transform are null and data.protocol is not set: "
                                  "give the transforms or choose a protocol (protocol=pfenet|hsnet)")  # fmt: skip
            made = protocol_transforms(
                settings["train"], settings["test"], settings["size"], settings.get("scale")
            )
            train_transform = train_transform or made[0]
            test_transform = test_transform or made[1]
        self.train_transform, self.test_transform = train_transform, test_transform
        self._indexes: dict[tuple[str, bool], ClassIndex] = {}

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    def _index(self, split: str, exclude_novel: bool = False) -> ClassIndex:
        """The split's class index, restricted to the (image, class) pairs its list names, if any.
        exclude_novel (BAM): without the images that show any class not trained on (judged on the
        full label, before the list's restriction); otherwise such objects are background."""
        key = (split, exclude_novel)
        if key not in self._indexes:
            index = load_class_index(self.source, split)
            if exclude_novel:
                index = without_classes(index, self.base)
            self._indexes[key] = restrict_index(index, self.source.split_pairs(split))
        return self._indexes[key]

    def _episodes(self, split: str, classes: list[int], num_episodes: int, seed: int) -> list[EpisodeSpec]:
        return load_or_create_episodes(
            self.source.cache_dir(), f"{self.source.name}_{split}_fold{self.fold}_shot{self.shot}",
            self._index(split), classes=classes, shot=self.shot, num_episodes=num_episodes, seed=seed,
            min_area=self.min_area, order=self.test_order,
        )  # fmt: skip

    def _val_episodes(self) -> list[EpisodeSpec]:
        """selection=test_episodes: the test list itself (the authors' way: optimistic); otherwise
        episodes drawn with val_seed (null: test_seed + 1), held out from the test list."""
        if self.selection == "test_episodes":
            return self._test_episodes()
        seed = self.test_seed + 1 if self.val_seed is None else self.val_seed
        return self._episodes(self.val_split, self.val_classes, self.num_val_episodes, seed)

    def _test_episodes(self, num_episodes: int | None = None, seed: int | None = None) -> list[EpisodeSpec]:
        n = self.num_test_episodes if num_episodes is None else num_episodes
        return self._episodes(self.test_split, self.novel, n, self.test_seed if seed is None else seed)

    @property
    def num_base_classes(self) -> int:
        """The fold's base classes (semantic mode's labels are 0..num_base_classes)."""
        return len(self.base)

    def _check_label_maps(self, what: str) -> None:
        if type(self.source).load_label is SegmentationSource.load_label:
            raise ConfigError(f"{what} needs semantic label maps, which {self.source.name} does not have")

    def _semantic_images(self, split: str, transform: PairTransform, train: bool) -> SemanticImages:
        ids = list(self._index(split, train and self.exclude_novel_in_train))
        if not ids:
            raise DataError(f"{self.source.name} split {split!r} has no images")
        return SemanticImages(self.source, transform, ids, self.base, train)

    def prepare_data(self) -> None:
        # Rank 0 only: generate/check the data, build the class indexes and the episode files once.
        self.source.prepare()
        self._index(self.train_split)
        if self.task == "semantic":
            self._check_label_maps("data.task=semantic")
            self._index(self.val_split)
            self._index(self.test_split)
            return
        if self.base_label:
            self._check_label_maps("data.base_label=true")
        self._val_episodes()
        for seed in self.test_seeds or [self.test_seed]:
            self._test_episodes(seed=seed)

    def setup(self, stage: str | None = None) -> None:
        if self.task == "semantic":
            # BAM validates on the whole val list (the test split unless data.val_split is set).
            if stage in (None, "fit"):
                self.train_set = self._semantic_images(self.train_split, self.train_transform, True)
                self.val_set = self._semantic_images(self.val_split, self.test_transform, False)
            if stage in (None, "test", "validate"):
                self.test_set = self._semantic_images(self.test_split, self.test_transform, False)
                if stage == "validate":
                    self.val_set = self.test_set
            return
        base = self.base if self.base_label else None
        if stage in (None, "fit"):
            self.train_set = TrainEpisodes(
                self.source,
                self.train_transform,
                self.shot,
                self._index(self.train_split, self.exclude_novel_in_train),
                self.base,
                self.min_area,
                base,
                self.train_order,
            )
            self.val_set = FixedEpisodes(
                self.source, self.test_transform, self.shot, self._val_episodes(), base
            )
        if stage in (None, "test", "validate"):
            runs = [self._test_episodes(seed=s) for s in self.test_seeds or [self.test_seed]]
            self.test_set = FixedEpisodes(self.source, self.test_transform, self.shot, base=base, runs=runs)
            if stage == "validate":
                self.val_set = self.test_set

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if train:  # the order of (seed, epoch, position), split over the ranks, resumable mid-epoch
            position = (lambda: training_position(trainer)) if trainer is not None else None
            sampler = TrainOrder(dataset, self.seed, batch_size, world, rank, position)
        elif isinstance(dataset, FixedEpisodes):
            # grouped by query image (a small feature cache keeps the reuse), each episode exactly
            # once across ranks, so DDP gives the one-process metric
            sampler = QueryGroupedOrder(dataset, world, rank)
        elif world > 1:
            # Each item exactly once across ranks (Lightning's default sampler pads with repeats).
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)
        else:
            sampler = None
        return ResumableLoader(
            dataset, batch_size=batch_size, drop_last=train, num_workers=self.num_workers, sampler=sampler,
            collate_fn=collate_episodes, persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.test_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.test_batch_size, train=False)
