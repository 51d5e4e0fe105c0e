"""ASGNet, the PSPNet/VGG backbones and the paper presets from the command line, on the tiny
synthetic benchmark (random weights, 57 px crops, a few steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, compose_train_cfg, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.evaluate import load_run
from fewshotseg.train import train


def test_method_asgnet_trains_and_its_checkpoint_reloads(tmp_path, data_dir):
    args = [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", "method=asgnet"]
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


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=asgnet", "backbone=resnet50_psp", "shot=2"],  # frozen, BN drifting as in the official code
        ["method=panet", "backbone=vgg16_panet", "method.model.feature_layer=block5"],
    ],
    ids=["asgnet-resnet50_psp", "panet-vgg16"],
)
def test_paper_backbones_train_a_few_steps(tmp_path, data_dir, overrides):
    cfg = compose_train_cfg(tmp_path, data_dir, [*overrides, "test=false", "data.num_val_episodes=4"])
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4


def compose_plain(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("name,backbone,weights", [
    ("asgnet_pascal_r50", "resnet50_psp", "initmodel/resnet50_v2.pth"),
    ("asgnet_pascal_r101", "resnet101_psp", "initmodel/resnet101_v2.pth"),
])  # fmt: skip
def test_asgnet_pascal_presets(name, backbone, weights):
    cfg = compose_plain([f"experiment={name}", "shot=5", "fold=3"])
    assert cfg.backbone.name == backbone and cfg.backbone.weights.endswith(weights)
    assert cfg.backbone.frozen and cfg.backbone.bn_mode == "train"
    assert cfg.data.source._target_.endswith("PascalVOC")
    assert list(cfg.method.model.bins) == [60, 30, 15, 8]
    assert cfg.method.optimizer.lr == 0.025 and cfg.method.optimizer.weight_decay == 1e-4
    assert cfg.method.scheduler._target_ == "fewshotseg.schedules.poly" and cfg.method.scheduler.power == 0.9
    assert cfg.data.batch_size == 4 and cfg.data.protocol == "pfenet" and cfg.trainer.max_epochs == 200
    assert cfg.data.protocols.pfenet.size == 473 and list(cfg.data.protocols.pfenet.scale) == [0.9, 1.1]
    assert cfg.shot == 5 and cfg.data.shot == 5 and cfg.data.fold == 3
    # a user's backbone override still wins over the preset's
    assert compose_plain([f"experiment={name}", "backbone=resnet18"]).backbone.name == "resnet18"


def test_panet_preset():
    cfg = compose_plain(["experiment=panet_pascal"])
    assert cfg.backbone.name == "vgg16_panet" and not cfg.backbone.frozen
    assert cfg.method.model.feature_layer == "block5"
    assert cfg.method.optimizer.lr == 1e-3 and cfg.method.optimizer.weight_decay == 5e-4
    assert list(cfg.method.scheduler.milestones) == [10000, 20000]
    assert cfg.trainer.max_steps == 30000 and cfg.data.batch_size == 1
    assert OmegaConf.to_container(cfg.data.train_transform) == {
        "_target_": "fewshotseg.data.transforms.resize_transform", "size": 417, "flip_p": 0.5}
    assert cfg.data.test_transform.size == 417 and cfg.eval_resolution == "input"


COCO_CONF = Path(CONFIG_DIR) / "data" / "coco.yaml"


@pytest.mark.skipif(not COCO_CONF.is_file(), reason="conf/data/coco.yaml is not there yet (COCO support lands separately)")
def test_asgnet_coco_preset():
    cfg = compose_plain(["experiment=asgnet_coco_r50", "fold=2"])
    assert cfg.backbone.name == "resnet50_psp"
    assert list(cfg.method.model.bins) == [1.0, 0.5, 0.25, 0.125]
    assert cfg.method.optimizer.lr == 0.05 and cfg.data.batch_size == 8
    assert cfg.data.protocol == "pfenet" and cfg.data.protocols.pfenet.size == 641 and cfg.trainer.max_epochs == 50
    assert cfg.data.fold == 2 and cfg.data.fold_split == "interleaved"
