"""Feature reuse in evaluation (feature_cache.py) and batched testing: the metric states with reuse
on equal those with reuse off, bit for bit, for every method on a frozen backbone; a trainable
backbone or a random test transform reuses nothing; the memory bound evicts and recomputes; the
PFENet protocol's batched test gives the metric states of its one-episode-at-a-time test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer

from fewshotseg.backbones import Backbone, BlockFeatures
from fewshotseg.data.eval_order import QueryGroupedOrder, grouped_by_query
from fewshotseg.data.sampling import EpisodeSpec
from fewshotseg.data.transforms import pad_transform, resize_transform, train_transform
from fewshotseg.feature_cache import FeatureCache, frozen_backbones, is_deterministic, reusing
from helpers.configs import compose_config
from helpers.sources import make_voc

METHODS = ["panet", "pfenet", "asgnet", "symnet", "qgnet", "dpnet"]  # every method on a frozen backbone
STATES = ("intersection", "union", "episodes", "fb_intersection", "fb_union")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    make_voc(root)
    return root


@pytest.fixture(scope="module")
def text_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "table.npy"
    t = torch.randn(21, 8, generator=torch.Generator().manual_seed(0))
    np.save(path, torch.nn.functional.normalize(t, dim=1).numpy())
    return path


def method_overrides(method: str, text_table) -> list[str]:
    extra = {
        "symnet": ["method.model.base_learner=null", f"method.model.text_table={text_table}",
                   "method.model.fallback_k=4", "method.model.freeze_backbone=true"],
        "qgnet": ["method.model.prior_extractor.init=supervised_copy"],
    }  # fmt: skip
    return [f"method={method}", *extra.get(method, [])]


def build(tmp_path, voc_root, overrides):
    """The datamodule and module of a tiny PASCAL-layout run (random weights, 41 px, PFENet protocol)."""
    from fewshotseg.runs import build_run

    cfg = compose_config(
        "train",
        [
            "data=pascal", f"data.root={voc_root}", "debug=tiny", "data.protocols.pfenet.size=41",
            "data.num_test_episodes=10", "data.test_batch_size=3", "backbone=resnet18", "backbone.frozen=true",
            "~callbacks.progress_bar", f"paths.log_dir={tmp_path}", *overrides,
        ],
        output_dir=tmp_path,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_run(cfg)


class KeepStates(Callback):
    """The test metric's sum states of each test loop (before the module resets them), and every
    episode's logits (random weights often predict one class everywhere: the states alone could
    not tell two feature maps apart)."""

    def __init__(self):
        self.states, self.logits = [], []

    def on_test_epoch_start(self, trainer, module):
        self.logits.append([])

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.logits[-1].append(self.last_logits)

    def on_test_epoch_end(self, trainer, module):
        self.states.append({k: getattr(module.test_iou, k).clone() for k in STATES})
        self.states[-1]["logits"] = torch.cat(self.logits[-1])


def states_of(datamodule, module, seeds=(0, 1)) -> list[dict]:
    keep = KeepStates()
    handle = module.method.register_forward_hook(
        lambda m, args, out: setattr(keep, "last_logits", out[0].clone())
    )
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[keep], enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    try:
        for seed in seeds:
            datamodule.test_seed = seed
            trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        handle.remove()
    return keep.states


def assert_same(a: list[dict], b: list[dict], atol: float = 1e-6) -> None:
    """Identical metric states; logits equal up to float rounding. A backbone pass over a subset
    of a batch (the cache's misses) or another batch size may round the last bit differently on
    some CPUs (1.2e-7 seen on an AMD EPYC, none on others); 1e-6 stays far from a real change."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["episodes"].sum() > 0
        for key in STATES:
            assert torch.equal(x[key], y[key]), key
        torch.testing.assert_close(x["logits"], y["logits"], rtol=0, atol=atol)


@pytest.mark.parametrize("method", METHODS)
def test_reuse_gives_the_same_metric_states(tmp_path, voc_root, text_table, method):
    datamodule, module = build(tmp_path, voc_root, method_overrides(method, text_table))
    assert frozen_backbones(module.method), "the run's backbone must be frozen"
    module.set_feature_reuse({"enabled": False})
    off = states_of(datamodule, module)
    module.set_feature_reuse({"enabled": True})
    on = states_of(datamodule, module)
    assert_same(off, on)
    cache = module.feature_cache
    assert cache.hits > 0 and cache.misses > 0  # seed 1 repeats images of seed 0


def test_a_trainable_backbone_reuses_nothing(tmp_path, voc_root, text_table):
    datamodule, module = build(tmp_path, voc_root, ["method=pfenet", "backbone.frozen=false"])
    assert frozen_backbones(module.method) == []
    states_of(datamodule, module)
    assert module.feature_cache.hits == module.feature_cache.misses == 0 and not module.feature_cache.store


def test_a_random_test_transform_reuses_nothing(tmp_path, voc_root):
    assert is_deterministic(pad_transform(41)) and is_deterministic(resize_transform(41))
    assert not is_deterministic(resize_transform(41, flip_p=0.5)) and not is_deterministic(
        train_transform(41)
    )
    assert not is_deterministic(None)
    datamodule, module = build(tmp_path, voc_root, ["method=pfenet"])
    datamodule.test_transform = resize_transform(41, flip_p=0.5)
    states_of(datamodule, module)
    assert module.feature_cache.hits == module.feature_cache.misses == 0 and not module.feature_cache.store


def test_a_changed_backbone_state_drops_the_cache(tmp_path, voc_root):
    datamodule, module = build(tmp_path, voc_root, ["method=pfenet"])

    def rerun() -> tuple[int, int]:
        module.feature_cache.reset_counts()
        states_of(datamodule, module, seeds=(0,))
        return module.feature_cache.hits, module.feature_cache.misses

    first = rerun()  # hits: images repeated within the list
    assert rerun() == (sum(first), 0)  # the same state: every map kept
    backbone = frozen_backbones(module.method)[0]
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)  # e.g. a checkpoint loaded, BN statistics drifted
    changed = rerun()
    module.set_feature_reuse({"enabled": True})  # an empty cache
    assert changed == rerun() and changed[1] > 0  # every map recomputed, as from an empty cache


@pytest.mark.parametrize("method", METHODS)
def test_batched_pfenet_protocol_test_equals_one_episode_at_a_time(tmp_path, voc_root, text_table, method):
    """Under the PFENet protocol the inputs are padded to one square, so episodes batch; scoring at
    the original resolution is per episode. Reuse off, so only the batching differs."""
    states = []
    for batch_size in (1, 4):
        datamodule, module = build(
            tmp_path / str(batch_size),
            voc_root,
            [*method_overrides(method, text_table), f"data.test_batch_size={batch_size}"],
        )
        module.set_feature_reuse({"enabled": False})
        assert datamodule.eval_resolution == "original" and module.eval_resolution is None
        states.append(states_of(datamodule, module, seeds=(0,)))
    assert_same(*states, atol=1e-4)


# --- the cache itself -------------------------------------------------------------------------------
def test_the_memory_bound_evicts_and_recomputes():
    calls = []

    def compute(images):
        calls.append(len(images))
        return {"a": images * 2}

    owner = torch.nn.Identity()
    images = torch.randn(3, 3, 8, 8)
    one = images[0].numel() * 4
    cache = FeatureCache(max_gb=2.5 * one / 2**30)  # room for two images' maps
    cache.rows(owner, images[:2], ["a"], compute)
    assert cache.bytes == 2 * one and cache.evictions == 0
    cache.rows(owner, images[2:], ["a"], compute)  # evicts image 0 (least recently used)
    assert cache.evictions == 1 and cache.bytes <= 2.5 * one
    out = cache.rows(owner, images[:2], ["a"], compute)  # image 1 kept, image 0 recomputed
    assert calls == [2, 1, 1] and torch.equal(out["a"], images[:2] * 2)
    assert cache.hits == 1 and cache.misses == 4


def test_backbone_maps_from_the_cache_equal_a_fresh_pass():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", levels=[2, 3, 4], frozen=True).eval()
    blocks = BlockFeatures(backbone, [2, 3, 4])
    x = torch.randn(4, 3, 41, 41)
    cache = FeatureCache()
    with torch.no_grad():
        fresh, fresh_blocks = backbone(x), blocks(x)[1]
        with reusing(cache, [backbone]):
            backbone(x[1:3], levels=[2, 3])  # a partial pass (PFENet's support side)
            mixed = backbone(x)  # rows 1, 2 lack level 4: recomputed with rows 0, 3
            again = backbone(x)  # every row kept
            blocks(x[:2])
            feats, block_maps = blocks(x)
    assert cache.hits == 4 + 2  # `again`, and the block pass over rows 0, 1
    for maps in (mixed, again, feats):
        assert all(torch.equal(maps[level], fresh[level]) for level in fresh)
    assert all(
        torch.equal(a, b)
        for level in fresh_blocks
        for a, b in zip(block_maps[level], fresh_blocks[level], strict=True)
    )
    assert again[3].is_contiguous(memory_format=torch.channels_last)  # the fresh pass's format


def test_training_passes_bypass_the_cache():
    backbone = Backbone("resnet18", levels=[3], frozen=False)
    cache = FeatureCache()
    with reusing(cache, [backbone]):
        backbone(torch.randn(2, 3, 33, 33))
    assert not cache.store and backbone.feature_cache is None


# --- several seeds in one loop, grouped by query image ---------------------------------------------
class _Episodes:
    def __init__(self, queries: str):
        self.episodes = [EpisodeSpec(q, 1, ("s",)) for q in queries]

    def __len__(self) -> int:
        return len(self.episodes)


def test_the_evaluation_order_groups_each_query_and_splits_over_ranks():
    data = _Episodes("abcabcab")  # a list cycling over three query images
    assert grouped_by_query(data.episodes) == [0, 3, 6, 1, 4, 7, 2, 5]
    assert list(QueryGroupedOrder(data)) == [0, 3, 6, 1, 4, 7, 2, 5]
    ranks = [list(QueryGroupedOrder(data, 3, r)) for r in range(3)]
    assert ranks == [[0, 3], [6, 1, 4], [7, 2, 5]]  # contiguous runs, each episode exactly once


class KeepLogits(Callback):
    """Every episode's logits by (test list, position in it)."""

    def __init__(self):
        self.logits = {}

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        runs = batch.get("test_run", torch.zeros_like(batch["episode_idx"]))
        for i, (run, idx) in enumerate(zip(runs.tolist(), batch["episode_idx"].tolist(), strict=True)):
            self.logits[run, idx] = self.last[i]


def run_results(datamodule, module, seeds, keep: KeepLogits | None = None) -> list[dict]:
    def hook(m, args, out) -> None:
        if keep is not None:
            keep.last = out[0].clone()

    handle = module.method.register_forward_hook(hook)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[keep] if keep else [],
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    datamodule.test_seeds = list(seeds)
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        datamodule.test_seeds = None
        handle.remove()
    return module.run_results


@pytest.mark.parametrize("method", ["pfenet", "symnet"])
def test_seeds_in_one_grouped_loop_score_as_one_loop_per_seed(tmp_path, voc_root, text_table, method):
    """`evaluate`'s loop: every seed's list at once, grouped by query image, batched, reusing
    features; each seed's result equals its own loop's (batch 1, no reuse), episode by episode."""
    overrides = method_overrides(method, text_table)
    datamodule, module = build(tmp_path / "one", voc_root, [*overrides, "data.test_batch_size=1"])
    module.set_feature_reuse({"enabled": False})
    separate, alone = [], {}
    for run, seed in enumerate((0, 1, 2)):
        keep = KeepLogits()
        separate += run_results(datamodule, module, [seed], keep)
        alone.update({(run, idx): v for (_, idx), v in keep.logits.items()})
    datamodule, module = build(tmp_path / "all", voc_root, [*overrides, "data.test_batch_size=3"])
    keep = KeepLogits()
    together = run_results(datamodule, module, (0, 1, 2), keep)
    assert together == separate
    assert keep.logits.keys() == alone.keys() and len(alone) == 30
    for key, logits in alone.items():
        torch.testing.assert_close(keep.logits[key], logits, rtol=0, atol=1e-4)
    assert module.feature_cache.hits > 0


def test_grouped_seeds_keep_their_reuse_with_a_small_cache(tmp_path, voc_root):
    """With room for a few images only, one loop per seed (list order) loses the seeds' shared
    queries from the cache; the grouped loop keeps them."""
    datamodule, module = build(tmp_path, voc_root, ["method=pfenet", "data.test_batch_size=1"])
    run_results(datamodule, module, [0])
    per_image = module.feature_cache.peak_bytes / len({k[0] for k in module.feature_cache.store})
    rates = {}
    for grouped in (False, True):
        module.set_feature_reuse({"enabled": True, "max_gb": 3 * per_image / 2**30})
        if grouped:
            run_results(datamodule, module, (0, 1, 2))
        else:
            for seed in (0, 1, 2):
                run_results(datamodule, module, [seed])
        rates[grouped] = module.feature_cache.hit_rate
    assert module.feature_cache.evictions > 0
    assert rates[True] > 0.4 and rates[True] > 2 * rates[False], rates


def test_an_image_twice_in_one_batch_is_computed_once():
    calls = []

    def compute(images):
        calls.append(len(images))
        return {"a": images * 2}

    images = torch.randn(2, 3, 8, 8)
    batch = images[[0, 1, 0, 0]]
    out = FeatureCache().rows(torch.nn.Identity(), batch, ["a"], compute)
    assert calls == [2] and torch.equal(out["a"], batch * 2)


def test_the_masked_stage_is_reused_for_the_same_masked_input_only():
    """PFENet's support level 4 runs on the masked level 3: kept per input map, so a support seen
    again with the same mask reuses it, and another mask does not."""
    torch.manual_seed(0)
    backbone = Backbone("resnet18", levels=[3, 4], frozen=True).eval()
    l3 = backbone(torch.randn(2, 3, 41, 41))[3]
    masks = (torch.rand(2, 1, *l3.shape[-2:]) > 0.5).float()
    cache = FeatureCache()
    with torch.no_grad():
        fresh = backbone.run_stage(l3 * masks, 4)
        with reusing(cache, [backbone]):
            first = backbone.run_stage(l3 * masks, 4)
            again = backbone.run_stage(l3 * masks, 4)
            other = backbone.run_stage(l3 * masks.flip(0), 4)  # the masks swapped: new inputs
    assert (cache.misses, cache.hits) == (4, 2)
    torch.testing.assert_close(first, fresh, rtol=0, atol=1e-6)
    assert torch.equal(again, first)
    torch.testing.assert_close(other, backbone.run_stage(l3 * masks.flip(0), 4), rtol=0, atol=1e-6)
