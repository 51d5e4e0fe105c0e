"""The order and the randomness of training data as a function of (seed, epoch, position) only.

Each epoch visits the training items in a permutation drawn from (seed, epoch); the item at position
p of that permutation gets its own random stream (seed, epoch, p) for the episode's class, its
supports and its augmentation. So the batches of a step do not depend on the worker count, on the
global RNG, or on whether the run was stopped and resumed: a run resumed from a checkpoint written
mid-epoch starts at the next position of the same permutation (`training_position`), and ends with
the numbers of the run that was never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# What a TrainOrder yields: the dataset index and the item's seed (seed, epoch, position).
OrderedItem = tuple[int, tuple[int, int, int]]


def item_key(key: int | OrderedItem) -> tuple[int, np.random.Generator]:
    """(index, its random stream) of a dataset key: a TrainOrder item, or a bare index (seeded by it)."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), np.random.default_rng(list(seed))
    return int(key), np.random.default_rng(int(key))


def training_position(trainer) -> tuple[int, int]:
    """(epoch, batches already trained in it) where fitting stands, read when an epoch's iterator is
    made: at the start of an epoch, or (resuming) right after Lightning restored a checkpoint's loop
    counters, before it advances them. A checkpoint written after the epoch's last batch resumes at
    the start of the next epoch."""
    loop = trainer.fit_loop
    epoch, batches = loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress
    if batches.is_last_batch:
        return epoch + 1, 0
    return epoch, batches.current.processed


# A DistributedSampler only so that Lightning does not wrap it in its own under DDP: it splits each
# epoch's permutation over the ranks itself (rank r takes positions r, r + world, ...).
class TrainOrder(DistributedSampler):
    def __init__(self, dataset: Dataset, seed: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 position: Callable[[], tuple[int, int]] | None = None):  # fmt: skip
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.position = position  # (epoch, batches done) from the trainer; None: set_epoch's epoch, from 0

    def __iter__(self) -> Iterator[OrderedItem]:
        epoch, batches_done = self.position() if self.position is not None else (self.epoch, 0)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        positions = range(self.rank, self.num_samples * self.num_replicas, self.num_replicas)
        for p in list(positions)[batches_done * self.batch_size :]:
            yield int(order[p]), (self.seed, epoch, p)


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch exactly (TrainOrder restarts where the
    checkpoint stopped), so Lightning does not warn that it would not."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
