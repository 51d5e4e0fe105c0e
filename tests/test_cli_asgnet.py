"""ASGNet, the PSPNet/VGG backbones and the paper presets from the command line, on the tiny
synthetic benchmark (random weights, 57 px crops, a few steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.data.transforms import protocol_transforms
from fewshotseg.evaluate import load_run
from fewshotseg.train import train
from helpers import TINY_OVERRIDES, build_on_meta, compose_config, compose_train_cfg, run_cli


def test_method_asgnet_trains_and_its_checkpoint_reloads(tmp_path, data_dir):
    args = [
        *TINY_OVERRIDES,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "method=asgnet",
        "backbone=resnet18",  # ASGNet's own default is the paper's frozen resnet50_psp
    ]
    proc = run_cli("fewshotseg.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"test mIoU:\s+[\d.]+", proc.stdout)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    csv = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/aux" in csv  # the FEM auxiliary loss is logged
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg, _, module = load_run(str(ckpt), OmegaConf.create({}))  # strict load of every tensor
    assert cfg.method.model._target_ == "fewshotseg.methods.asgnet.ASGNet"
    assert module.method.down_conv[0].in_channels == 128 + 256  # resnet18 layer2 + layer3


def test_asgnet_on_the_psp_backbone_trains_a_few_steps(tmp_path, data_dir):
    short = [
        "test=false",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
    ]
    train(compose_train_cfg(tmp_path, data_dir, ["method=asgnet", "backbone=resnet50_psp", *short]))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    # frozen backbone, BatchNorm statistics drifting as in the official code
    drifted = state["state_dict"]["method.backbone.body.bn1.num_batches_tracked"]
    assert drifted == 2 * 2  # 2 steps x (query call + 1 shot call)


@pytest.mark.parametrize("name,backbone,weights", [
    ("asgnet_pascal_r50", "resnet50_psp", "initmodel/resnet50_v2.pth"),
    ("asgnet_pascal_r101", "resnet101_psp", "initmodel/resnet101_v2.pth"),
])  # fmt: skip
def test_asgnet_pascal_presets(name, backbone, weights):
    cfg = compose_config("train", [f"experiment={name}", "shot=5", "fold=3"])
    assert cfg.backbone.name == backbone and cfg.backbone.weights.endswith(weights)
    assert cfg.backbone.frozen and cfg.backbone.bn_mode == "train"
    assert cfg.data.source._target_.endswith("PascalVOC")
    assert list(cfg.method.model.bins) == [60, 30, 15, 8]
    assert cfg.method.optimizer.lr == 0.025 and cfg.method.optimizer.weight_decay == 1e-4
    assert cfg.method.scheduler._target_ == "fewshotseg.schedules.poly" and cfg.method.scheduler.power == 0.9
    assert cfg.data.batch_size == 4 and cfg.data.protocol == "pfenet" and cfg.trainer.max_epochs == 200
    assert cfg.data.protocols.pfenet.size == 473 and list(cfg.data.protocols.pfenet.scale) == [0.9, 1.1]
    assert cfg.shot == 5 and cfg.data.shot == 5 and cfg.data.fold == 3
    model = build_on_meta(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 10_423_818
    # a user's backbone override still wins over the preset's
    assert compose_config("train", [f"experiment={name}", "backbone=resnet18"]).backbone.name == "resnet18"


def test_panet_preset():
    cfg = compose_config("train", ["experiment=panet_pascal"])
    assert cfg.backbone.name == "vgg16_panet" and not cfg.backbone.frozen
    assert cfg.method.model.level == 4
    assert cfg.method.optimizer.lr == 1e-3 and cfg.method.optimizer.weight_decay == 5e-4
    assert list(cfg.method.scheduler.milestones) == [10000, 20000]
    assert cfg.trainer.max_steps == 30000 and cfg.data.batch_size == 1
    # PANet's protocol: resize 417 + flip for training, resize 417 for the test, scored at 417
    settings = cfg.data.protocols[cfg.data.protocol]
    train_t, test_t = protocol_transforms(settings.train, settings.test, settings.size)
    assert train_t.description == test_t.description == "squash-resize to 417 x 417"
    assert [type(op).__name__ for op in train_t.pipeline.transforms][:2] == ["Resize", "HorizontalFlip"]
    assert cfg.data.train_transform is None and settings.eval_resolution == "input"
    model = build_on_meta(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == 14_714_688


COCO_CONF = Path(CONFIG_DIR) / "data" / "coco.yaml"


@pytest.mark.skipif(
    not COCO_CONF.is_file(), reason="conf/data/coco.yaml is not there yet (COCO support lands separately)"
)
def test_asgnet_coco_preset():
    cfg = compose_config("train", ["experiment=asgnet_coco_r50", "fold=2"])
    assert cfg.backbone.name == "resnet50_psp"
    assert list(cfg.method.model.bins) == [1.0, 0.5, 0.25, 0.125]
    assert cfg.method.optimizer.lr == 0.05 and cfg.data.batch_size == 8
    assert (
        cfg.data.protocol == "pfenet"
        and cfg.data.protocols.pfenet.size == 641
        and cfg.trainer.max_epochs == 50
    )
    assert cfg.data.fold == 2 and cfg.data.fold_split == "interleaved"


@pytest.mark.skipif(
    not COCO_CONF.is_file(), reason="conf/data/coco.yaml is not there yet (COCO support lands separately)"
)
def test_method_asgnet_data_coco_fold2(tmp_path):
    """The user's example, `method=asgnet data=coco fold=2`, on a COCO-layout fixture."""
    sources = pytest.importorskip("helpers.sources")  # the COCO source tests' fixture writer
    root = tmp_path / "COCO2014"
    sources.make_coco(root)
    overrides = [
        "method=asgnet", "data=coco", "fold=2", f"data.root={root}", "debug=tiny", "data.min_area=0",
        "data.protocols.pfenet.size=57", "data.test_batch_size=4", "~callbacks.progress_bar",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}",
    ]  # fmt: skip
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    assert cfg.data.fold_split == "interleaved" and cfg.data.protocol == "pfenet"
    # The paper's setting comes with the method and dataset alone (conf/preset/asgnet_coco.yaml).
    assert cfg.backbone.name == "resnet50_psp" and cfg.backbone.frozen and cfg.backbone.bn_mode == "train"
    assert cfg.method.optimizer.lr == 0.05 and list(cfg.method.model.bins) == [1.0, 0.5, 0.25, 0.125]
    assert cfg.seed == 321
    results = train(cfg)
    assert 0.0 <= results["miou"] <= 1.0
    fold2 = {sources.coco_names()[c - 1] for c in range(3, 81, 4)}  # interleaved: classes 4k + 3
    assert results["iou_per_class"] and set(results["iou_per_class"]) <= fold2
