import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewshotseg.data.datamodule import FewShotDataModule, binarise
from fewshotseg.data.folds import base_classes, fold_classes
from fewshotseg.data.index import load_class_index
from fewshotseg.data.sources.pascal import VOCLayoutSource
from fewshotseg.data.sources.synthetic import SyntheticSource
from fewshotseg.data.transforms import resize_transform, train_transform
from fewshotseg.errors import ConfigError, DataError
from helpers import SMALL


def make_dm(root, fold=0, shot=1, num_workers=0, **kwargs):
    source = lambda root: SyntheticSource(root, **SMALL)  # noqa: E731
    params = dict(batch_size=3, test_batch_size=5, num_val_episodes=10, num_test_episodes=23)
    params.update(kwargs)
    dm = FewShotDataModule(
        root,
        source,
        train_transform(57),
        resize_transform(57),
        fold=fold,
        shot=shot,
        num_workers=num_workers,
        **params,
    )
    dm.prepare_data()
    return dm


def test_fold_class_lists():
    assert fold_classes(20, 4, 0) == [1, 2, 3, 4, 5]
    assert fold_classes(20, 4, 3) == [16, 17, 18, 19, 20]
    assert fold_classes(80, 4, 2, "interleaved")[:3] == [3, 7, 11]
    assert fold_classes(80, 4, 1, "consecutive")[0] == 21
    assert set(base_classes(20, 4, 1)) == set(range(1, 21)) - {6, 7, 8, 9, 10}


def test_binarise_keeps_ignore_and_drops_other_classes():
    label = np.array([[0, 3, 5, 255]], dtype=np.uint8)
    assert binarise(label, 5).tolist() == [[0, 0, 1, 255]]


@pytest.mark.parametrize("shot", [1, 5])
def test_test_episodes_only_novel_classes_and_never_query_as_support(synthetic_root, shot):
    dm = make_dm(synthetic_root, fold=1, shot=shot)
    dm.setup("test")
    episodes = dm.test_set.episodes
    assert len(episodes) == 23
    for e in episodes:
        assert e.class_id in dm.novel
        assert e.query not in e.supports and len(e.supports) == shot
    batch = next(iter(dm.test_dataloader()))
    assert batch["support_imgs"].shape == (5, shot, 3, 57, 57)
    assert batch["support_masks"].shape == (5, shot, 57, 57)
    assert set(batch["class_id"].tolist()) <= set(dm.novel)


def test_training_episodes_never_show_novel_classes_as_foreground(synthetic_root):
    dm = make_dm(synthetic_root, fold=2, shot=2)
    dm.setup("fit")
    index = load_class_index(dm.source, "train")
    novel = set(dm.novel)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        assert item["class_id"] in dm.base
        assert item["query_id"] not in item["support_ids"]
        for image_id in [item["query_id"], *item["support_ids"]]:
            assert item["class_id"] in index[image_id]
        # The query label is binarised for a base class: novel objects in it are background.
        assert set(torch.unique(item["query_mask"]).tolist()) <= {0, 1, 255}
    assert all(c not in novel for c in dm.train_set.pools)


def test_test_episodes_identical_for_0_and_2_workers(synthetic_root):
    batches = {}
    for workers in (0, 2):
        dm = make_dm(synthetic_root, num_workers=workers)
        dm.setup("test")
        batches[workers] = list(dm.test_dataloader())
    assert len(batches[0]) == len(batches[2])
    for a, b in zip(batches[0], batches[2]):
        assert a["query_id"] == b["query_id"] and a["support_ids"] == b["support_ids"]
        for key in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id", "episode_idx"):
            assert torch.equal(a[key], b[key]), key


def test_episode_file_is_reused(synthetic_root):
    dm = make_dm(synthetic_root, fold=3)
    files = sorted((dm.source.cache_dir() / "episodes").glob("synthetic_val_fold3_shot1_*.json"))
    assert len(files) == 2  # validation and test lists
    saved = {json.dumps(json.loads(f.read_text())["episodes"]) for f in files}
    make_dm(synthetic_root, fold=3)
    assert {json.dumps(json.loads(f.read_text())["episodes"]) for f in files} == saved


def test_class_index_is_cached_and_rebuilt_when_labels_change(tmp_path):
    from fewshotseg.data.sources.synthetic_gen import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=3, num_train=12, num_val=6, image_size=32)
    source = VOCLayoutSource(root, [f"c{i}" for i in range(1, 21)], name="syn")
    index = load_class_index(source, "train")
    cache = source.cache_dir() / "index_train.json"
    assert cache.is_file() and len(index) == 12
    first_id = next(iter(index))
    label = np.zeros((32, 32), np.uint8)
    label[:4, :4] = 7
    Image.fromarray(label, mode="L").save(root / "SegmentationClassAug" / f"{first_id}.png")
    assert load_class_index(source, "train")[first_id] == {7: 16}


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(DataError, match=r"does-not-exist.*JPEGImages"):
        VOCLayoutSource(tmp_path / "does-not-exist").prepare()


def test_corrupt_image_is_named(tmp_path):
    from fewshotseg.data.sources.synthetic_gen import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=1, num_train=8, num_val=4, image_size=32)
    source = SyntheticSource(root, seed=1, num_train=8, num_val=4, image_size=32)
    bad = root / "JPEGImages" / "train_000002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"train_000002\.jpg"):
        source.load_image("train_000002")


def test_label_values_outside_class_list(tmp_path):
    from fewshotseg.data.sources.synthetic_gen import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=1, num_train=8, num_val=4, image_size=32)
    Image.fromarray(np.full((32, 32), 42, np.uint8), mode="L").save(
        root / "SegmentationClassAug" / "train_000001.png"
    )
    with pytest.raises(DataError, match=r"train_000001\.png.*\[42\].*0\.\.20"):
        SyntheticSource(root, seed=1, num_train=8, num_val=4, image_size=32).load_label("train_000001")


@pytest.mark.parametrize("fold", [-1, 4])
def test_fold_out_of_range(synthetic_root, fold):
    with pytest.raises(ConfigError, match=rf"fold={fold}.*0\.\.3"):
        make_dm(synthetic_root, fold=fold)


def test_shot_below_one(synthetic_root):
    with pytest.raises(ConfigError, match=r"shot=0"):
        make_dm(synthetic_root, shot=0)


def test_train_crop_keeps_foreground_and_pads_with_ignore():
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[2:6, 2:6] = 1  # a small object in a corner, easily cropped away
    transform = train_transform(57, crop_redraws=10)
    for seed in range(10):
        transform.set_seed(seed)
        img, out = transform(image, mask)
        assert img.shape == (3, 57, 57) and out.shape == (57, 57)
        assert (out == 255).any()  # padding to 57 uses the ignore label
        assert (out == 1).any()
