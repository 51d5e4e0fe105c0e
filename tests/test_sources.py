"""The real benchmarks' readers on small fixtures written in their on-disk formats: PASCAL VOC folders
(palette PNGs with 255 borders, VOC/SBD/PFENet/HSNet/BAM lists), COCO 2014 (JSON with polygons,
compressed and uncompressed RLE, crowd regions), FSS-1000 class folders, and your own folders."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshotseg.data.datamodule import FewShotDataModule
from fewshotseg.data.index import load_class_index
from fewshotseg.data.lists import read_list
from fewshotseg.data.sources.base import label_areas
from fewshotseg.data.sources.coco import COCO20i
from fewshotseg.data.sources.folder import FolderSource
from fewshotseg.data.sources.fss1000 import FSS1000
from fewshotseg.data.sources.pascal import PascalVOC
from fewshotseg.data.transforms import resize_transform, train_transform
from fewshotseg.errors import ConfigError, DataError
from helpers.sources import (
    COCO_CONSECUTIVE,
    COCO_INTERLEAVED,
    FSS_SPLITS,
    PASCAL_FOLDS,
    coco_names,
    coco_reference_label,
    make_coco,
    make_fss,
    make_voc,
    parse_folds,
)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    return root, make_voc(root)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "COCO2014"
    return root, make_coco(root)


@pytest.fixture(scope="module")
def fss(tmp_path_factory):
    root = tmp_path_factory.mktemp("fss") / "FSS-1000"
    make_fss(root, FSS_SPLITS)
    return root


def datamodule(root, source, fold=0, shot=1, protocol="pfenet", workers=0, **kwargs) -> FewShotDataModule:
    size = kwargs.pop("size", 41)
    params = dict(num_val_episodes=6, num_test_episodes=20, batch_size=2, test_batch_size=3)
    params.update(kwargs)
    protocols = {
        "pfenet": {"train": "augment", "test": "pad", "size": size, "scale": [0.9, 1.1], "test_order": "image", "min_area": 2048, "eval_resolution": "original"},
        "hsnet": {"train": "resize", "test": "resize", "size": size, "test_order": "pair", "min_area": 0, "eval_resolution": "input"},
    }  # fmt: skip
    dm = FewShotDataModule(
        root,
        source,
        fold=fold,
        shot=shot,
        num_workers=workers,
        protocol=protocol,
        protocols=protocols,
        **params,
    )
    dm.prepare_data()
    return dm


# --- fold class lists (docs/protocols.md) -------------------------------------------------------------
@pytest.mark.parametrize("fold", range(4))
def test_pascal_fold_lists_match_protocol(fold):
    source = PascalVOC("/unused")
    split = source.class_split(fold, 4, "consecutive")
    expected = parse_folds(PASCAL_FOLDS)[fold]
    assert [(c, source.class_names[c - 1]) for c in split.test] == expected
    assert split.val == split.test and sorted(split.train + split.test) == list(range(1, 21))


@pytest.mark.parametrize(
    "fold_split,table", [("interleaved", COCO_INTERLEAVED), ("consecutive", COCO_CONSECUTIVE)]
)
@pytest.mark.parametrize("fold", range(4))
def test_coco_fold_lists_match_protocol(fold, fold_split, table):
    source = COCO20i("/unused")
    split = source.class_split(fold, 4, fold_split)
    assert [(c, source.class_names[c - 1]) for c in split.test] == parse_folds(table)[fold]
    assert sorted(split.train + split.test) == list(range(1, 81))


def test_coco_datamodule_defaults_to_interleaved(coco, tmp_path):
    root, _ = coco
    dm = datamodule(root, COCO20i, fold=2, fold_split="interleaved", protocol="hsnet", test_order="class")
    assert dm.novel == [4 * k + 3 for k in range(20)]


# --- PASCAL ----------------------------------------------------------------------------------------
def test_pascal_default_train_list_is_voc_plus_sbd_without_val(voc):
    root, truth = voc
    source = PascalVOC(root)
    train = source.image_ids("train")
    assert train == truth["train"]  # VOC train, then SBD-only ids; duplicates once; no val image
    assert not set(train) & set(source.image_ids("val"))
    all_ids = PascalVOC(root, train_images="all").image_ids("train")
    assert sorted(all_ids) == sorted(truth["train"])  # every label that is not a val image


def test_pascal_missing_sbd_list_names_file_and_source(voc, tmp_path):
    root, _ = voc
    with pytest.raises(DataError, match=r"sbd_missing\.txt.*train_noval\.txt.*train_images=all"):
        PascalVOC(root, sbd_list="ImageSets/Segmentation/sbd_missing.txt").image_ids("train")


def test_pascal_labels_keep_255_borders(voc):
    root, truth = voc
    source = PascalVOC(root)
    image_id = truth["val"][1]
    label = source.load_label(image_id)
    assert np.array_equal(label, truth["labels"][image_id]) and (label == 255).any()
    mask = source.load_mask(image_id, 2)
    assert set(np.unique(mask)) <= {0, 1, 255} and (mask == 255).sum() == (label == 255).sum()


def test_pascal_area_rule(voc):
    root, truth = voc
    dm = datamodule(
        root, PascalVOC, fold=0, protocol="pfenet", num_test_episodes=200
    )  # min_area 2048, all images
    index = dm._index("val")
    small_only = [i for i, a in index.items() if any(c in dm.novel and area < 2048 for c, area in a.items())]
    assert small_only, "the fixture has small novel objects"
    dm.setup("test")
    pools = {c: set() for c in dm.novel}
    for e in dm.test_set.episodes:
        for s in e.supports:
            pools[e.class_id].add(s)
            assert index[s][e.class_id] >= 2048  # supports only where the class passes the rule
    queries = {e.query for e in dm.test_set.episodes}
    for q in queries:  # a query image needs one novel class above the rule (PFENet's list)
        assert any(c in dm.novel and a >= 2048 for c, a in index[q].items())
    loose = datamodule(root, PascalVOC, fold=0, protocol="pfenet", min_area=0, num_test_episodes=200)
    loose.setup("test")
    assert {e.query for e in loose.test_set.episodes} > queries  # small objects count once the rule is off


def test_pascal_pfenet_list_file(voc, tmp_path):
    root, truth = voc
    lst = tmp_path / "voc_sbd_merge_noduplicate.txt"
    lst.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in truth["train"][:12]))
    source = PascalVOC(root, train_list=str(lst))
    assert source.image_ids("train") == truth["train"][:12]
    assert source.split_pairs("train") is None
    assert np.array_equal(source.load_label(truth["train"][3]), truth["labels"][truth["train"][3]])


def test_pascal_hsnet_split_files_restrict_pairs(voc, tmp_path):
    root, truth = voc
    trn = tmp_path / "hsnet" / "trn"
    trn.mkdir(parents=True)
    # fold files list IMAGEID__CLS pairs; an image may be listed for only one of its classes
    image_id = truth["train"][5]
    classes = sorted(c for c in np.unique(truth["labels"][image_id]) if c not in (0, 255))
    assert len(classes) == 2
    for k in range(4):
        lines = [
            f"{i}__{(n % 20) + 1}"
            for n, i in enumerate(truth["train"])
            if (n % 20) // 5 == k and i != image_id
        ]
        if k == (classes[0] - 1) // 5:
            lines.append(f"{image_id}__{classes[0]}")
        (trn / f"fold{k}.txt").write_text("\n".join(lines) + "\n")
    source = PascalVOC(root, train_list=str(trn))
    assert image_id in source.image_ids("train")
    assert source.split_pairs("train")[image_id] == {classes[0]}
    dm = FewShotDataModule(root, lambda root: PascalVOC(root, train_list=str(trn)), train_transform(41), resize_transform(41),
                           fold=3, num_workers=0, min_area=0)  # fmt: skip
    dm.prepare_data()
    assert set(dm._index("train")[image_id]) == {classes[0]}  # the other class is never its episode class


def test_bam_dict_literal_and_hsnet_pickle_lists(tmp_path):
    bam = tmp_path / "sub_class_file_list_0.txt"
    bam.write_text(
        "{1: [('JPEGImages/a.jpg', 'SegmentationClassAug/a.png')], 2: [['JPEGImages/b.jpg', 'SegmentationClassAug/b.png'], ('JPEGImages/a.jpg', 'SegmentationClassAug/a.png')]}"
    )
    entries = read_list(bam)
    assert entries.ids == ["a", "b"] and entries.classes == {"a": {1, 2}, "b": {2}}
    pkl = tmp_path / "fold0.pkl"
    pkl.write_bytes(
        pickle.dumps(
            {
                0: ["train2014/COCO_train2014_000000000009.jpg"],
                4: ["train2014/COCO_train2014_000000000025.jpg"],
            }
        )
    )
    entries = read_list(pkl)
    assert entries.classes == {"COCO_train2014_000000000009": {1}, "COCO_train2014_000000000025": {5}}
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({0: [Path("x")]}))  # needs a class: refused, never constructed
    with pytest.raises(DataError, match=r"refusing to unpickle pathlib"):
        read_list(evil)
    bad = tmp_path / "bad.txt"
    bad.write_text("{__import__('os').system('echo hi')}")
    with pytest.raises(DataError, match=r"not a dict literal"):
        read_list(bad)


# --- COCO ------------------------------------------------------------------------------------------
def test_coco_class_ids_follow_category_order(coco):
    root, _ = coco
    assert COCO20i(root).class_names == coco_names()


@pytest.mark.parametrize("crowd", ["foreground", "ignore"])
def test_coco_labels_and_index_are_exact(coco, tmp_path, crowd):
    root, truth = coco
    source = COCO20i(root, crowd=crowd)
    for split in ("train", "val"):
        index = load_class_index(source, split)
        data = truth[split]
        with_anns = {a["image_id"] for a in data["annotations"]}
        expected_ids = sorted(Path(im["file_name"]).stem for im in data["images"] if im["id"] in with_anns)
        assert list(index) == expected_ids  # images without annotations are not in the split
        for im in data["images"]:
            if im["id"] not in with_anns:
                continue
            image_id = Path(im["file_name"]).stem
            label = source.load_label(image_id)
            assert np.array_equal(label, coco_reference_label(data, im, crowd)), image_id
            assert index[image_id] == label_areas(label, 80), image_id  # visible pixels, exactly
    if crowd == "ignore":
        assert any((source.load_label(i) == 255).any() for i in index)


def test_coco_store_and_index_are_reused_and_rebuilt(coco, tmp_path, monkeypatch):
    root, truth = coco
    load_class_index(COCO20i(root), "val")
    # a restart reads the cached index and the converted store; nothing is rebuilt
    monkeypatch.setattr(COCO20i, "_build_store", lambda *a: pytest.fail("store rebuilt"))
    source = COCO20i(root)
    index = load_class_index(source, "val")
    some = next(iter(index))
    assert label_areas(source.load_label(some), 80) == index[some]
    monkeypatch.undo()
    # a changed annotation file invalidates both
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = [
        a
        for a in data["annotations"]
        if Path(next(im["file_name"] for im in data["images"] if im["id"] == a["image_id"])).stem != some
    ]
    path.write_text(json.dumps(data))
    try:
        assert some not in load_class_index(COCO20i(root), "val")
    finally:
        path.write_text(json.dumps(truth["val"]))


def test_coco_png_labels(coco, tmp_path):
    root, truth = coco
    source = COCO20i(root)
    for split in ("train", "val"):  # write PFENet/HSNet-style label PNGs from the JSON labels
        out = tmp_path / "annotations" / f"{split}2014"
        out.mkdir(parents=True)
        for i in source.image_ids(split):
            Image.fromarray(source.load_label(i)).save(out / f"{i}.png")
    for d in ("train2014", "val2014"):
        (tmp_path / d).symlink_to(root / d)
    png = COCO20i(tmp_path, labels="png")
    index = load_class_index(png, "val")
    assert index == load_class_index(source, "val")


def test_coco_missing_annotations_name_the_download(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    with pytest.raises(DataError, match=r"instances_train2014\.json.*annotations_trainval2014\.zip"):
        COCO20i(tmp_path).prepare()


# --- FSS-1000 --------------------------------------------------------------------------------------
def test_fss_class_split_and_fold(fss):
    source = FSS1000(fss)
    names = source.class_names
    assert names == sorted(FSS_SPLITS["trn"]) + sorted(FSS_SPLITS["val"]) + sorted(FSS_SPLITS["test"])
    split = source.class_split(0, 1, "consecutive")
    assert [names[c - 1] for c in split.test] == sorted(FSS_SPLITS["test"])
    assert [names[c - 1] for c in split.val] == sorted(FSS_SPLITS["val"])
    with pytest.raises(ConfigError, match=r"fold=1: FSS-1000 has one fixed class split"):
        source.class_split(1, 1, "consecutive")


def test_fss_every_test_image_is_a_query_once(fss):
    dm = datamodule(
        fss,
        FSS1000,
        protocol="hsnet",
        num_test_episodes=12,
        train_split="train",
        val_split="val",
        test_split="test",
    )
    dm.setup(None)
    test_ids = FSS1000(fss).image_ids("test")
    assert sorted(e.query for e in dm.test_set.episodes) == sorted(test_ids)  # 3 classes x 4 images
    for e in dm.test_set.episodes:
        assert e.class_id in dm.novel and e.query not in e.supports
        assert all(s.split("/")[0] == e.query.split("/")[0] for s in e.supports)
    assert {e.class_id for e in dm.val_set.episodes} <= set(dm.val_classes)
    item = dm.test_set[0]
    assert set(torch.unique(item["query_mask"]).tolist()) <= {0, 1}  # grey < 128 is background


def test_fss_missing_class_list(tmp_path):
    (tmp_path / "abacus").mkdir()
    with pytest.raises(DataError, match=r"trn\.txt.*HSNet"):
        _ = FSS1000(tmp_path).class_names


# --- your own folders ------------------------------------------------------------------------------
def make_folder(root: Path, per_class: bool) -> None:
    (root / "images").mkdir(parents=True)
    names = ["cat", "dog", "car", "bus"]
    (root / "classes.txt").write_text("_background_\n" + "\n".join(names) + "\n")
    for n in range(12):
        image = np.full((40, 48, 3), 30 * (n % 8), np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{n:02d}.png")
        a, b = n % 4 + 1, (n + 1) % 4 + 1
        if per_class:
            for c, y in ((a, 2), (b, 22)):
                (root / "masks" / names[c - 1]).mkdir(parents=True, exist_ok=True)
                m = np.zeros((40, 48), np.uint8)
                m[y : y + 14, 4:40] = 255
                Image.fromarray(m).save(root / "masks" / names[c - 1] / f"img{n:02d}.png")
        else:
            (root / "masks").mkdir(exist_ok=True)
            label = np.zeros((40, 48), np.uint8)
            label[2:16, 4:40], label[22:36, 4:40], label[16, :] = a, b, 255
            Image.fromarray(label).save(root / "masks" / f"img{n:02d}.png")


@pytest.mark.parametrize("per_class", [False, True])
def test_folder_source_episodes(tmp_path, per_class):
    make_folder(tmp_path, per_class)
    source = FolderSource(tmp_path, folds=[["cat", "dog"], ["car", "bus"]])
    assert source.class_names == ["cat", "dog", "car", "bus"]
    assert source.mask_format == ("per_class" if per_class else "indexed")
    dm = datamodule(tmp_path, lambda root: FolderSource(root, folds=[["cat", "dog"], ["car", "bus"]]), fold=1,
                    protocol="hsnet", num_test_episodes=10)  # fmt: skip
    assert dm.novel == [3, 4] and dm.base == [1, 2]
    dm.setup(None)
    assert all(e.class_id in (3, 4) and e.query not in e.supports for e in dm.test_set.episodes)
    assert all(dm.train_set[i]["class_id"] in (1, 2) for i in range(len(dm.train_set)))
    index = load_class_index(source, "train")
    assert index["img00"] == {1: 14 * 36, 2: 14 * 36}


def test_folder_label_outside_class_list_and_image_without_label(tmp_path):
    make_folder(tmp_path, per_class=False)
    Image.fromarray(np.full((40, 48), 9, np.uint8)).save(tmp_path / "masks" / "img03.png")
    source = FolderSource(tmp_path)
    with pytest.raises(
        DataError, match=r"img03\.png has values \[9\] outside the class list: expected 0\.\.4 or 255"
    ):
        load_class_index(source, "train")
    (tmp_path / "masks" / "img03.png").unlink()
    with pytest.raises(DataError, match=r"img03\.png.*every image needs a label"):
        load_class_index(FolderSource(tmp_path), "train")


def test_folder_per_class_image_without_mask(tmp_path):
    make_folder(tmp_path, per_class=True)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(DataError, match=r"lonely\.png has no mask in any class folder"):
        load_class_index(FolderSource(tmp_path), "train")


def test_folder_unknown_fold_class(tmp_path):
    make_folder(tmp_path, per_class=False)
    with pytest.raises(ConfigError, match=r"folds\[0\] names 'horse'"):
        FolderSource(tmp_path, folds=[["horse"]]).class_split(0, 1, "consecutive")


# --- episodes across sources -----------------------------------------------------------------------
SOURCES = {
    "pascal": (PascalVOC, "voc"),
    "coco": (COCO20i, "coco"),
}


@pytest.mark.parametrize("name", ["pascal", "coco"])
@pytest.mark.parametrize("exclude", [False, True])
def test_training_episodes_never_show_novel_classes(request, name, exclude):
    make, fixture = SOURCES[name]
    root = request.getfixturevalue(fixture)[0]
    dm = datamodule(root, make, fold=1, shot=2, min_area=0, exclude_novel_in_train=exclude,
                    fold_split="interleaved" if name == "coco" else "consecutive")  # fmt: skip
    dm.setup("fit")
    index = dm._index("train")
    novel = set(dm.novel)
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        assert item["class_id"] in dm.base and item["query_id"] not in item["support_ids"]
        for image_id in [item["query_id"], *item["support_ids"]]:
            label = dm.source.load_label(image_id)
            mask = dm.source.load_mask(image_id, item["class_id"])
            assert not mask[np.isin(label, list(novel))].any()  # novel objects are background
            if exclude:
                assert not set(index[image_id]) & novel  # BAM: such images are not used at all
    assert len(dm.train_set) > 0


@pytest.mark.parametrize("name,protocol", [("pascal", "pfenet"), ("pascal", "hsnet"), ("coco", "hsnet")])
@pytest.mark.parametrize("shot", [1, 3])
def test_test_episodes_hold_only_novel_classes(request, name, protocol, shot):
    make, fixture = SOURCES[name]
    root = request.getfixturevalue(fixture)[0]
    order = "class" if name == "coco" else None
    dm = datamodule(root, make, fold=2, shot=shot, protocol=protocol, min_area=0 if name == "coco" else None,
                    test_order=order, fold_split="interleaved" if name == "coco" else "consecutive")  # fmt: skip
    dm.setup("test")
    assert len(dm.test_set) == 20
    index = dm._index("val")
    for e in dm.test_set.episodes:
        assert e.class_id in dm.novel and e.query not in e.supports and len(e.supports) == shot
        assert e.class_id in index[e.query]
    batch = next(iter(dm.test_dataloader()))
    assert batch["support_imgs"].shape[1:] == (shot, 3, 41, 41)
    assert set(batch["class_id"].tolist()) <= set(dm.novel)


@pytest.mark.parametrize("name", ["pascal", "coco"])
def test_same_episodes_for_0_and_2_workers(request, name):
    make, fixture = SOURCES[name]
    root = request.getfixturevalue(fixture)[0]
    batches = {}
    for workers in (0, 2):
        dm = datamodule(root, make, fold=0, workers=workers, min_area=0, num_test_episodes=9,
                        fold_split="interleaved" if name == "coco" else "consecutive")  # fmt: skip
        dm.setup("test")
        batches[workers] = list(dm.test_dataloader())
    assert len(batches[0]) == len(batches[2]) == 3
    for a, b in zip(batches[0], batches[2]):
        assert a["query_id"] == b["query_id"] and a["support_ids"] == b["support_ids"]
        for key in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id", "episode_idx"):
            assert torch.equal(a[key], b[key]), key
        assert all(torch.equal(x, y) for x, y in zip(a["query_mask_orig"], b["query_mask_orig"]))


def test_missing_root_is_named_for_every_dataset(tmp_path):
    missing = tmp_path / "nowhere"
    for source, layout in (
        (PascalVOC, r"JPEGImages"),
        (COCO20i, r"train2014"),
        (FSS1000, r"<class>/<n>\.jpg"),
        (FolderSource, r"images"),
    ):
        with pytest.raises(DataError, match=rf"{re.escape(str(missing))} does not exist.*{layout}"):
            source(missing).prepare()


def test_coco_json_layouts_give_the_same_result(coco, tmp_path):
    from fewshotseg.data.sources import coco_json
    from fewshotseg.data.sources.coco import COCO_CLASSES

    root, truth = coco
    data = truth["val"]
    reference = coco_json.convert(
        root / "annotations" / "instances_val2014.json", 2, "foreground", COCO_CLASSES
    )
    assert (
        coco_json._parallel_parse((root / "annotations" / "instances_val2014.json").read_text(), 2, "x")
        is not None
    )
    odd = dict(data)
    odd["annotations"] = [
        {**a, "attributes": [{"a": 1}, {"b": 2}]} for a in data["annotations"]
    ]  # splits in the wrong place
    variants = {
        "indented": json.dumps(data, indent=1),
        "annotations first": json.dumps(
            {"annotations": data["annotations"], "categories": data["categories"], "images": data["images"]}
        ),
        "nested objects": json.dumps(odd),
    }
    assert coco_json._parallel_parse(variants["nested objects"], 2, "x") is None  # detected, parsed serially
    for name, text in variants.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        for workers in (1, 2):
            assert coco_json.convert(path, workers, "foreground", COCO_CLASSES) == reference, (name, workers)
