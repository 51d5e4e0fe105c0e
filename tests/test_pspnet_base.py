"""BAM's base-learner stage: base-class labels, the semantic data mode, the episodes' query base
label, the semantic metric, PSPNetBase, its checkpoints (ours and the authors') and the CLI."""

from __future__ import annotations

import re
from functools import partial

import cv2
import numpy as np
import pytest
import torch

from fewshotseg.backbones import Backbone
from fewshotseg.checkpoints import state_digest
from fewshotseg.data.datamodule import FewShotDataModule
from fewshotseg.data.sources.base import base_labels
from fewshotseg.data.sources.synthetic import SyntheticSource
from fewshotseg.data.transforms import resize_transform, train_transform
from fewshotseg.errors import ConfigError
from fewshotseg.methods.pspnet_base import (
    PSPNetBase,
    convert_official_state,
    load_base_learner,
    to_official_state,
)
from fewshotseg.metrics import SemanticIoU
from helpers import SMALL, TINY_OVERRIDES, compose_config, run_cli


def bam_base_label(label: np.ndarray, sub_list: list[int], num_classes: int) -> np.ndarray:
    """BAM's get_mulway_base_data.py loop, as written there (the reference)."""
    out, tmp = label.copy(), label.copy()
    for cls in range(1, num_classes + 1):
        rows, cols = np.where(tmp == cls)
        out[rows, cols] = sub_list.index(cls) + 1 if cls in sub_list else 0
    return out


def make_dm(root, **kwargs):
    source = lambda root: SyntheticSource(root, **SMALL)  # noqa: E731
    params = dict(batch_size=3, test_batch_size=5, num_val_episodes=10, num_test_episodes=12, num_workers=0)
    params.update(kwargs)
    dm = FewShotDataModule(root, source, train_transform(57), resize_transform(57), **params)
    dm.prepare_data()
    return dm


# ------------------------------------------------------------------------------------------------
# Labels and data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [0, 2])
def test_base_labels_match_bams_loop(fold):
    rng = np.random.default_rng(fold)
    label = rng.integers(0, 21, (30, 40)).astype(np.uint8)
    label[rng.random((30, 40)) < 0.1] = 255
    base = [c for c in range(1, 21) if not (5 * fold < c <= 5 * fold + 5)]
    out = base_labels(label, base)
    assert np.array_equal(out, bam_base_label(label, base, 20))
    assert np.array_equal(out == 255, label == 255)  # ignore kept
    novel = (label >= 5 * fold + 1) & (label <= 5 * fold + 5)
    assert (out[novel] == 0).all()  # novel classes -> background
    assert set(np.unique(out)) <= {*range(0, 16), 255}  # ids 1..Nb
    assert out[label == base[0]].tolist() == [1] * int((label == base[0]).sum())


def test_semantic_mode_serves_whole_images_with_base_labels(synthetic_root):
    dm = make_dm(synthetic_root, fold=1, task="semantic")
    dm.setup("fit")
    assert dm.num_base_classes == 15
    assert len(dm.train_set) == SMALL["num_train"] and len(dm.val_set) == SMALL["num_val"]
    # validation: the deterministic resize of the BAM-relabelled label, computed independently
    for i in (0, 7):
        item = dm.val_set[i]
        raw = dm.source.load_label(item["image_id"])
        expected = cv2.resize(bam_base_label(raw, dm.base, 20), (57, 57), interpolation=cv2.INTER_NEAREST)
        assert torch.equal(item["label"], torch.from_numpy(expected).long())
        assert item["image"].shape == (3, 57, 57)
    item = dm.train_set[3]
    assert set(torch.unique(item["label"]).tolist()) <= {*range(16), 255}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 57, 57) and batch["label"].shape == (3, 57, 57)
    assert isinstance(batch["image_id"], list)


def test_query_base_label_moves_with_the_query(synthetic_root):
    dm = make_dm(synthetic_root, fold=0, base_label=True)
    dm.setup("fit")
    dm.setup("test")
    seen_novel = False
    for i in range(12):  # training: random scale, rotation, flip and crop
        item = dm.train_set[i]
        c = item["class_id"]
        target, base = item["query_mask"], item["query_base_label"]
        assert base.shape == target.shape and base.dtype == torch.long
        ignore = target == 255
        assert torch.equal(base == 255, ignore)
        # the episode's (base) class: the same pixels in both labels, so the same geometry
        assert torch.equal((base == dm.base.index(c) + 1)[~ignore], (target == 1)[~ignore])
        assert set(torch.unique(base).tolist()) <= {*range(16), 255}
    for i in range(len(dm.test_set)):  # test episodes: the query's novel class is background
        item = dm.test_set[i]
        fg = item["query_mask"] == 1
        assert (item["query_base_label"][fg] == 0).all()
        seen_novel |= bool(fg.any())
    assert seen_novel
    batch = next(iter(dm.train_dataloader()))
    assert batch["query_base_label"].shape == batch["query_mask"].shape
    plain = make_dm(synthetic_root, fold=0)
    plain.setup("fit")
    assert "query_base_label" not in plain.train_set[0]


def test_bad_task_is_a_config_error(synthetic_root):
    with pytest.raises(ConfigError, match="data.task"):
        make_dm(synthetic_root, task="instances")


# ------------------------------------------------------------------------------------------------
# Metric
# ------------------------------------------------------------------------------------------------


def numpy_miou(preds, targets, k):
    """BAM's intersectionAndUnion summed over images, mean IoU over classes 1..k-1."""
    inter, union = np.zeros(k), np.zeros(k)
    for p, t in zip(preds, targets):
        p, t = p.ravel().copy(), t.ravel()
        p[t == 255] = 255
        i = p[p == t]
        ai = np.histogram(i, bins=np.arange(k + 1))[0]
        ap = np.histogram(p, bins=np.arange(k + 1))[0]
        at = np.histogram(t, bins=np.arange(k + 1))[0]
        inter, union = inter + ai, union + ap + at - ai
    iou = inter / (union + 1e-10)
    return iou[1:].mean(), iou


def test_semantic_metric_matches_numpy_and_sums_across_ranks():
    g = torch.Generator().manual_seed(0)
    k = 6
    preds = torch.randint(0, k, (4, 13, 17), generator=g)
    targets = torch.randint(0, k - 1, (4, 13, 17), generator=g)  # class 5 never in the truth
    targets[torch.rand(4, 13, 17, generator=g) < 0.2] = 255
    preds[targets == 1] = 1  # some agreement
    ref_miou, ref_iou = numpy_miou(preds.numpy(), targets.numpy(), k)
    whole = SemanticIoU(k)
    whole.update(preds, targets)
    out = whole.compute()
    assert out["miou"].item() == pytest.approx(ref_miou, abs=1e-9)
    assert np.allclose(out["iou_per_class"].numpy(), ref_iou, atol=1e-9)
    # two "ranks" with their own halves: the summed states give the same numbers
    a, b = SemanticIoU(k), SemanticIoU(k)
    a.update(preds[:1], targets[:1])
    b.update(preds[1:], targets[1:])
    for name in ("intersection", "union", "target"):
        setattr(a, name, getattr(a, name) + getattr(b, name))
    assert a.compute()["miou"].item() == out["miou"].item()
    with pytest.raises(ValueError):
        whole.update(preds, torch.full_like(targets, k))


# ------------------------------------------------------------------------------------------------
# Model and checkpoints
# ------------------------------------------------------------------------------------------------


def small_base(num_classes=16):
    torch.manual_seed(0)
    return PSPNetBase(partial(Backbone, name="resnet18", output_stride=8), num_classes=num_classes)


def psp_base(num_classes=16):
    torch.manual_seed(0)
    return PSPNetBase(partial(Backbone, name="resnet50_psp", frozen=True), num_classes=num_classes)


def test_pspnet_base_shapes_and_logits_at_feature_resolution():
    model = small_base().eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        logits = model(x)
        feats = model.backbone(x)[4]
        base = model.base_logits(feats)
    assert logits.shape == (2, 16, 65, 65)
    assert base.shape == (2, 16, 9, 9)
    assert model.ppm(feats).shape[1] == 2 * model.backbone.channels[4]
    assert [f[0].output_size for f in model.ppm.features] == [1, 2, 3, 6]
    assert not model.backbone.frozen  # None: the backbone config's value (resnet18: trainable)
    frozen = PSPNetBase(partial(Backbone, name="resnet18"), num_classes=4, backbone_frozen=True)
    assert frozen.backbone.frozen


def test_official_state_round_trip_and_unmapped_keys():
    model = psp_base()
    ours = model.state_dict()
    official = to_official_state(ours)
    assert "layer0.0.weight" in official and "encoder.0.0.weight" in official  # BAM registers both
    assert "ppm.features.3.1.weight" in official and "cls.4.bias" in official
    assert official["layer0.7.running_var"] is ours["backbone.body.bn1.running_var"]
    wrapped = {"state_dict": {f"module.{k}": v for k, v in official.items()}, "epoch": 1}
    back = convert_official_state(wrapped)
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)
    # a checkpoint holding only the encoder.i copies maps too
    encoder_only = {k: v for k, v in official.items() if not k.startswith("layer")}
    assert set(convert_official_state(encoder_only)) == set(ours)
    with pytest.raises(ConfigError, match="layer0.9.weight"):  # VGG-style extras are named
        convert_official_state({**official, "layer0.9.weight": torch.zeros(1), "down.weight": torch.zeros(1)})


def test_load_base_learner_reads_bams_file_and_names_the_command(tmp_path):
    source = psp_base()
    path = tmp_path / "best.pth"
    official = {f"module.{k}": v for k, v in to_official_state(source.state_dict()).items()}
    torch.save({"epoch": 3, "state_dict": official}, path)
    target = psp_base()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    load_base_learner(path, target)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # the file says nothing else: named by its tensors
    assert target.backbone.start == f"best.pth (sha256 {state_digest(source.state_dict())})"
    with pytest.raises(
        ConfigError, match=r"python -m fewshotseg.train method=pspnet_base data=pascal fold=2"
    ):
        load_base_learner(tmp_path / "missing.ckpt", target, data="pascal", fold=2)
    with pytest.raises(ConfigError, match=r"Train it first with `make it`"):  # a preset's own command
        load_base_learner(tmp_path / "missing.ckpt", target, fold=2, command="make it")
    target.cls[4] = torch.nn.Conv2d(512, 61, 1)  # a COCO head
    with pytest.raises(ConfigError, match="shape mismatch"):
        load_base_learner(path, target)


def test_cli_trains_the_base_stage_and_its_checkpoint_loads(tmp_path, data_dir):
    args = [
        *TINY_OVERRIDES,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "method=pspnet_base",
        "backbone=resnet18",  # the method's own default is the paper's resnet50_psp
        "+trainer.limit_test_batches=2",
        f"save_weights_to={tmp_path / 'base_learners' / 'fold0.ckpt'}",  # as the regime preset does
    ]
    proc = run_cli("fewshotseg.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"base-class mIoU: [\d.]+ over 15 base classes", proc.stdout + proc.stderr)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    csv = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/miou" in csv and "train/loss" in csv
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    saved = torch.load(tmp_path / "base_learners" / "fold0.ckpt", map_location="cpu", weights_only=True)
    assert saved["state_dict"].keys() == state.keys()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in state.items())  # the tested weights
    model = small_base()
    assert torch.load(best, map_location="cpu", weights_only=True)["backbone_start"] == "random init"
    load_base_learner(best, model)
    assert model.backbone.start == "fine-tuned from random init"  # what a Sym-Net run on it records
    assert torch.equal(model.cls[4].weight, state["method.cls.4.weight"])
    assert torch.equal(
        model.backbone.state_dict()["body.conv1.weight"], state["method.backbone.body.conv1.weight"]
    )
    load_base_learner(best, model, data="synthetic", fold=0)
    with pytest.raises(ConfigError, match="trained on fold 0, this run is fold 1"):
        load_base_learner(best, model, data="synthetic", fold=1)
    with pytest.raises(ConfigError, match="does not fit"):
        load_base_learner(best, small_base(num_classes=7))


# ------------------------------------------------------------------------------------------------
# Configs and the optimiser
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "backbone_lr", "epochs", "fold_split"),
    [
        (["method=pspnet_base", "data=pascal"], 2.5e-4, 100, "consecutive"),
        (["experiment=pspnet_base_pascal_r50"], 2.5e-4, 100, "consecutive"),
        (["method=pspnet_base", "data=coco"], 2.5e-3, 20, "interleaved"),
        (["experiment=pspnet_base_coco_r50"], 2.5e-3, 20, "interleaved"),
    ],
)
def test_bam_presets(overrides, backbone_lr, epochs, fold_split):
    cfg = compose_config("train", overrides)
    assert cfg.data.task == "semantic" and cfg.method.task == "semantic"
    assert cfg.backbone.name == "resnet50_psp" and cfg.method.model.backbone_frozen is False
    assert cfg.data.train_transform.crop_size == 417 and list(cfg.data.train_transform.scale) == [0.5, 2.0]
    assert cfg.data.test_transform.size == 417
    assert cfg.method.backbone_lr == backbone_lr and cfg.method.optimizer.lr == 2.5e-3
    assert cfg.trainer.max_epochs == epochs and cfg.data.fold_split == fold_split
    assert cfg.data.batch_size == 12 and cfg.seed == 321
    assert cfg.callbacks.early_stopping.patience == 75


def test_effective_learning_rates_per_group():
    from fewshotseg.lit_semantic import SemanticSegModule

    model = small_base(num_classes=3)
    module = SemanticSegModule(
        model,
        partial(torch.optim.SGD, lr=2.5e-3, momentum=0.9),
        class_names=["bg", "a", "b"],
        backbone_lr=2.5e-4,
    )
    body, head = module.configure_optimizers().param_groups
    assert body["lr"] == 2.5e-4 and head["lr"] == 2.5e-3
    assert {id(p) for p in body["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(head["params"]) == len(list(model.ppm.parameters())) + len(list(model.cls.parameters()))
    with pytest.raises(ConfigError, match="3 classes"):
        SemanticSegModule(model, partial(torch.optim.SGD, lr=0.1), class_names=["bg", "a"])
