"""The Episode batch: what every dataset yields and every method consumes.

An episode is one query image with K support images of one target class. Masks are binary
relative to that class: 1 = target, 0 = anything else, 255 = ignore (object boundaries and padding).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch.utils.data import default_collate

IGNORE_INDEX = 255


class Episode(TypedDict, total=False):
    query_img: torch.Tensor  # [B,3,H,W] float, normalised
    query_mask: torch.Tensor  # [B,H,W] long in {0,1,255}
    support_imgs: torch.Tensor  # [B,K,3,H,W] float
    support_masks: torch.Tensor  # [B,K,H,W] long in {0,1,255}
    class_id: torch.Tensor  # [B] long, the dataset's own contiguous class id (1..N)
    episode_idx: torch.Tensor  # [B] long, position in the fixed test list (-1 in training)
    test_run: torch.Tensor  # [B] long, which of several test lists scored together (evaluate's seeds)
    query_id: list[str]  # image ids, for logging and for proving which episode ran
    support_ids: list[list[str]]  # [B][K]
    query_mask_orig: list[
        torch.Tensor
    ]  # binarised label at original resolution, in the test transform's frame (eval only):
    # [h_i,w_i] for a squash resize; padded with 255 to [L,L], L = max(h_i,w_i), for the PFENet resize
    query_base_label: torch.Tensor  # [B,H,W] long, only when the method asks (data.base_label=true):
    # the query's base-class label (BAM's label_b), transformed with the query: 1..Nb = the fold's
    # base classes in ascending class-id order, 0 = background and novel classes, 255 = ignore


class SemanticBatch(TypedDict, total=False):
    """Semantic mode (data.task=semantic, BAM's base-learner stage): whole images of a split."""

    image: torch.Tensor  # [B,3,H,W] float, normalised
    label: torch.Tensor  # [B,H,W] long: 0 background (and novel classes), 1..Nb base classes, 255 ignore
    image_id: list[str]


# Keys that cannot be stacked (variable sizes or strings) and are kept as lists.
_LIST_KEYS = ("query_id", "support_ids", "query_mask_orig", "image_id")


def collate_episodes(items: list[dict]) -> Episode:
    """Stack tensors; keep ids and original-size labels as lists."""
    lists = {k: [it.pop(k) for it in items] for k in _LIST_KEYS if k in items[0]}
    batch = default_collate(items)
    batch.update(lists)
    return batch
