"""The backbone pre-training stage (`python -m fewshotseg.pretrain_backbone`) and its corpus: the
corpus holds every category once per table row and labels its attributes exactly; the stage runs end
to end on a tiny corpus, reuses its file, refuses to overwrite a file made with other settings, and
resumes; its file loads into every method through `backbone.weights=` with no key edits and stays
untouched (BN statistics included) by training steps on top of it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshotseg.backbones import Backbone
from fewshotseg.cli import CONFIG_DIR
from fewshotseg.data.pretraining_corpus import (
    ALL_CATEGORIES,
    categories,
    generate_corpus,
    render_corpus_sample,
)
from fewshotseg.data.sources.synthetic_gen import _CLASS_TABLE, render_objects
from fewshotseg.errors import ConfigError
from fewshotseg.methods.base import without_stage_files
from fewshotseg.pretrain_backbone import pretrain_backbone
from fewshotseg.train import train
from helpers import compose_config, compose_train_cfg, run_cli

TINY_CORPUS = [
    "corpus.generation.num_train=24",
    "corpus.generation.num_val=8",
    "corpus.generation.image_size=64",
    "corpus.batch_size=4",
    "corpus.num_workers=0",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~logger",
]


def test_corpus_is_every_combination_with_the_benchmark_among_them():
    assert len(ALL_CATEGORIES) == len(set(ALL_CATEGORIES)) == 10 * 6 * 10 * 2
    assert set(_CLASS_TABLE) <= set(ALL_CATEGORIES)
    strict = categories(exclude_fold=1)
    assert len(strict) == 1195 and not set(_CLASS_TABLE[5:10]) & set(strict)
    assert set(_CLASS_TABLE[:5]) <= set(strict)


def test_attribute_labels_match_the_rendered_categories():
    """Each object's three label channels name its category's shape, texture and colour: the
    renderer's category label, decoded independently, against the written attribute ids."""
    for index in range(6):
        rng = np.random.default_rng([3, 10, index])  # the corpus's train stream for seed 3
        _, category = render_objects(rng, 64, ALL_CATEGORIES)
        _, attrs = render_corpus_sample(3, "train", index, 64)
        inside = (attrs[..., 0] != 255) & (category > 0)
        for row in np.unique(category[inside]):
            shape, texture, hue, dark = ALL_CATEGORIES[row - 1]
            got = attrs[inside & (category == row)]
            assert (got == [shape + 1, texture + 1, 2 * hue + int(dark) + 1]).all()
        assert (attrs[(category == 0) & (attrs[..., 0] != 255)] == 0).all()
        assert (attrs[..., 0] == 255).any()  # the outline band


def test_corpus_streams_differ_from_the_benchmark(tmp_path):
    from fewshotseg.data.sources.synthetic_gen import render_synthetic_sample

    corpus_image, _ = render_corpus_sample(0, "val", 0, 64)
    bench_image, _ = render_synthetic_sample(0, "val", 0, 64)
    assert not np.array_equal(corpus_image, bench_image)
    root = generate_corpus(tmp_path / "c", num_train=3, num_val=2, image_size=32, num_workers=0)
    label = np.asarray(Image.open(root / "labels" / "train_000001.png"))
    assert label.shape == (32, 32, 3) and label.dtype == np.uint8
    assert json.loads((root / "corpus.json").read_text())["num_categories"] == 1200


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    """(weights file, run folder) of one tiny pre-training run."""
    root = tmp_path_factory.mktemp("pretrain_backbone")
    run = root / "run"
    pretrain_backbone(compose_config("pretrain_backbone", [f"paths.root_dir={root}", *TINY_CORPUS], run))
    return root / "data" / "backbones" / "resnet18_synthetic.pth", run


def test_stage_writes_a_backbone_file_with_its_settings(stage):
    weights, run = stage
    state = torch.load(weights, weights_only=True)
    own = Backbone("resnet18", levels=[4]).body.state_dict()
    assert list(state) == list(own) and all(state[k].shape == own[k].shape for k in own)
    meta = json.loads(weights.with_name(weights.name + ".json").read_text())
    assert 0.0 <= meta["accuracy"]["category_acc"] <= 1.0 and meta["settings"]["corpus"]["image_size"] == 64
    # the file's digest, as a run on it records it (results.json's backbone_training), and its maker
    loaded = Backbone("resnet18", output_stride=8, weights=str(weights), frozen=True, bn_mode="eval")
    assert loaded.start == f"resnet18_synthetic.pth (sha256 {meta['sha256']})"
    assert meta["made_on"]["torch"] == torch.__version__ and meta["made_on"]["cpu"]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_second_run_reuses_other_settings_refuse_resume_continues(stage, capsys):
    weights, run = stage
    root = weights.parents[2]
    before = weights.stat().st_mtime_ns
    again = compose_config("pretrain_backbone", [f"paths.root_dir={root}", *TINY_CORPUS], root / "run2")
    assert pretrain_backbone(again) == weights and weights.stat().st_mtime_ns == before
    assert "reused (sha256 " in capsys.readouterr().out and not (root / "run2").exists()

    other = compose_config(
        "pretrain_backbone", [f"paths.root_dir={root}", *TINY_CORPUS, "seed=1"], root / "run3"
    )
    with pytest.raises(
        ConfigError, match=r"output=.*resnet18_synthetic\.pth: exists with other settings \(seed\)"
    ):
        pretrain_backbone(other)

    resumed = [f"paths.root_dir={root}", *TINY_CORPUS, "trainer.max_epochs=2",
               f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]  # fmt: skip
    pretrain_backbone(compose_config("pretrain_backbone", resumed, root / "run4"))
    assert weights.stat().st_mtime_ns != before
    ckpt = torch.load(root / "run4" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # 3 steps restored, 3 more trained


def test_cli_reports_accuracy_and_a_missing_file_names_the_command(tmp_path):
    proc = run_cli("fewshotseg.pretrain_backbone", f"paths.root_dir={tmp_path}", *TINY_CORPUS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "corpus val accuracy (pixels): category" in proc.stdout
    assert re.search(r"backbone written to .*resnet18_synthetic\.pth \(sha256 [0-9a-f]{8}, ", proc.stdout)
    proc = run_cli("fewshotseg.train", "backbone=resnet18_synthetic", f"paths.root_dir={tmp_path / 'none'}",
                   "debug=tiny", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "resnet18_synthetic.pth: file not found: make it with `python -m fewshotseg.pretrain_backbone`"
        )
    )


METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml") if p.stem != "all_foreground")
SHORT = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
         "data.num_val_episodes=2", "data.num_test_episodes=2", "~logger", "~callbacks.overlays", "test=false"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_file_loads_into_every_method_and_a_frozen_backbone_stays_unchanged(
    stage, method, tmp_path, data_dir
):
    weights, _ = stage
    overrides = [f"method={method}", "backbone=resnet18_synthetic", f"backbone.weights={weights}", *SHORT,
                 f"save_weights_to={tmp_path / 'saved.ckpt'}"]  # fmt: skip
    cfg = without_stage_files(compose_train_cfg(tmp_path, data_dir, overrides))
    train(cfg)
    assert "state_dict" in torch.load(tmp_path / "saved.ckpt", weights_only=True)  # also without a test
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    body = {k.removeprefix("method.backbone.body."): v for k, v in trained.items()
            if k.startswith("method.backbone.body.")}  # fmt: skip
    file = torch.load(weights, weights_only=True)
    assert body and set(body) <= set(file)  # methods that stop at level 3 build no layer4
    frozen = cfg.backbone.frozen and cfg.backbone.bn_mode == "eval"
    changed = [k for k in body if not torch.equal(body[k].float(), file[k].float())]
    if frozen:  # the papers' regime: weights and BN statistics untouched by the training steps
        assert not changed, changed[:5]
    else:  # a stage that fine-tunes its backbone (BAM's base learner) started from the file
        assert changed


REGIMES = sorted((Path(CONFIG_DIR) / "regime").glob("*.yaml"))


@pytest.mark.parametrize("path", REGIMES, ids=lambda p: p.stem)
def test_a_regime_preset_is_what_method_and_backbone_select(path):
    """`method=<m> backbone=<b>` alone picks conf/regime/<m>_<b>.yaml: every value the file sets is
    in the composed config (read from the YAML itself, not from the composition)."""
    names = [
        b.stem for b in (Path(CONFIG_DIR) / "backbone").glob("*.yaml") if path.stem.endswith(f"_{b.stem}")
    ]
    backbone = max(names, key=len)
    method = path.stem[: -len(backbone) - 1]
    cfg = compose_config("train", [f"method={method}", f"backbone={backbone}"])
    regime = OmegaConf.to_container(OmegaConf.load(path), resolve=False)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    raw = OmegaConf.to_container(cfg, resolve=False)  # ${...} as written

    def written(key):
        node = raw
        for part in key.split("."):
            node = node[part]
        return node

    for key, value in leaves(regime):
        assert (written(key) if "${" in str(value) else OmegaConf.select(cfg, key)) == value, key
    if method != "pspnet_base":  # every episodic run of the regime drops novel-class training images
        assert cfg.data.exclude_novel_in_train is True
