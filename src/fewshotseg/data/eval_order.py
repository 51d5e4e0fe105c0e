"""The order in which evaluation visits its fixed episodes: grouped by query image.

A fold's test list cycles through its query images (1000 episodes over a few hundred images), and
the seeds of one `evaluate` call repeat the same queries with other supports. Visited in list order,
an image comes back only after every other image of the fold, so a feature cache smaller than the
fold (feature_cache.py, least recently used first) would have dropped it: no reuse at all. Visited
grouped by query image, every episode of an image follows the first one, and a cache of a few
images keeps all of the query's reuse.

The metric is a sum over episodes (FewShotIoU), so the order does not change it; the dataset keeps
its list order (`dataset[i]` is still episode i), only the sampler reorders. Under DDP each rank
takes one contiguous run of the grouped order, so the episodes of an image stay on one rank, and
every episode is scored exactly once (no padding repeats).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import DistributedSampler

from fewshotseg.data.sampling import EpisodeSpec


def grouped_by_query(episodes: Sequence[EpisodeSpec]) -> list[int]:
    """Indices of `episodes`, the episodes of each query image together, images in order of first
    appearance, list order within an image."""
    first: dict[str, int] = {}
    for i, spec in enumerate(episodes):
        first.setdefault(spec.query, i)
    return sorted(range(len(episodes)), key=lambda i: first[episodes[i].query])


# A DistributedSampler only so that Lightning does not wrap it in its own under DDP.
class QueryGroupedOrder(DistributedSampler):
    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        order = grouped_by_query(dataset.episodes)
        start, stop = (len(order) * r // num_replicas for r in (rank, rank + 1))
        self.order = order[start:stop]
        self.num_samples = len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return self.num_samples
