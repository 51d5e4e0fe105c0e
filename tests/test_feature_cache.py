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


def assert_same(a: list[dict], b: list[dict], exact_logits: bool = True) -> None:
    """Identical metric states; logits identical, or (batch sizes compared) equal up to float
    rounding: the heads' convolutions may round differently for another batch size."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["episodes"].sum() > 0
        for key in STATES:
            assert torch.equal(x[key], y[key]), key
        if exact_logits:
            assert torch.equal(x["logits"], y["logits"])
        else:
            torch.testing.assert_close(x["logits"], y["logits"], rtol=1e-4, atol=1e-4)


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
    cache = module.feature_cache

    def rerun() -> tuple[int, int]:
        cache.reset_counts()
        states_of(datamodule, module, seeds=(0,))
        return cache.hits, cache.misses

    first = rerun()  # hits: images repeated within the list
    assert rerun() == (sum(first), 0)  # the same state: every image kept
    backbone = frozen_backbones(module.method)[0]
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)  # e.g. a checkpoint loaded, BN statistics drifted
    assert rerun() == first  # every map recomputed


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
    assert_same(*states, exact_logits=False)


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
