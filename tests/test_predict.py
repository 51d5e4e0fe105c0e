"""`python -m fewshotseg.predict` on the synthetic benchmark's own files: the masks it writes are
exactly those `evaluate` predicts for the same episode (original-resolution scoring), any K works,
and bad input is a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshotseg.data.episode import collate_episodes
from fewshotseg.errors import UserInputError
from fewshotseg.evaluate import load_run
from fewshotseg.predict import predict
from helpers import run_cli
from helpers.tiny_run import best_checkpoint, compose_tool, tiny_trained_run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir) -> Path:
    return best_checkpoint(tiny_trained_run(tmp_path_factory, data_dir))


class Recorder:
    """Stands in for the metric: keeps what evaluation scores (the prediction at original size)."""

    def __init__(self):
        self.preds = []

    def update(self, pred, target, class_idx):
        self.preds.append(pred[0])


def evaluate_predictions(ckpt: Path, synthetic_root: Path, n: int):
    """The first n test episodes of the run and the masks evaluation scores for them, at the label
    size (eval_resolution=original), through FewShotSegModule's own scoring code."""
    _, dm, module = load_run(
        str(ckpt), OmegaConf.create({"data": {"root": str(synthetic_root), "num_workers": 0}})
    )
    module.eval_resolution = "original"
    module.eval()
    dm.setup("test")
    episodes, preds = dm.test_set.episodes[:n], []
    for i in range(n):
        batch = collate_episodes([dm.test_set[i]])
        recorder = Recorder()
        with torch.no_grad():
            logits = module(batch)
            module._score(logits, batch, recorder)
        preds.append(recorder.preds[0].numpy())
    return episodes, preds, dm


def write_mask(label_png: Path, class_id: int, out: Path, value: int) -> Path:
    label = np.asarray(Image.open(label_png))
    Image.fromarray(((label == class_id) * value).astype(np.uint8)).save(out)
    return out


def test_predict_gives_exactly_the_evaluated_masks(ckpt, synthetic_root, tmp_path):
    episodes, preds, dm = evaluate_predictions(ckpt, synthetic_root, n=6)
    assert any(0 < p.sum() < p.size for p in preds), "a trivial model would make the test weak"
    for i, (spec, ref) in enumerate(zip(episodes, preds)):
        (support,) = spec.supports
        value = 255 if i % 2 else 1  # both mask conventions
        mask = write_mask(synthetic_root / "SegmentationClassAug" / f"{support}.png", spec.class_id,
                          tmp_path / f"support{i}.png", value)  # fmt: skip
        out = tmp_path / f"out{i}"
        cfg = compose_tool("predict", [f"ckpt={ckpt}", f"support=[{synthetic_root}/JPEGImages/{support}.jpg]",
                                       f"support_mask=[{mask}]", f"query={synthetic_root}/JPEGImages/{spec.query}.jpg",
                                       f"out={out}", "device=cpu"], tmp_path)  # fmt: skip
        (written,) = predict(cfg)
        got = np.asarray(Image.open(written))
        assert set(np.unique(got)) <= {0, 255}
        assert (
            got.shape
            == ref.shape
            == Image.open(synthetic_root / "JPEGImages" / f"{spec.query}.jpg").size[::-1]
        )
        np.testing.assert_array_equal(got // 255, ref)
        assert (out / f"{spec.query}_overlay.png").is_file()


def query_folder(synthetic_root: Path, ids: list[str], tmp_path: Path) -> tuple[int, Path]:
    """A class of the first image (the support) and a folder with the other images (the queries)."""
    label = np.asarray(Image.open(synthetic_root / "SegmentationClassAug" / f"{ids[0]}.png"))
    cls = int(next(c for c in np.unique(label) if c not in (0, 255)))
    queries = tmp_path / "queries"
    queries.mkdir()
    for q in ids[1:]:
        Image.open(synthetic_root / "JPEGImages" / f"{q}.jpg").save(queries / f"{q}.png")
    return cls, queries


def test_any_number_of_supports_and_a_query_folder(ckpt, synthetic_root, tmp_path):
    ids = ["val_000000", "val_000001", "val_000002"]
    cls, queries = query_folder(synthetic_root, ids, tmp_path)
    (queries / "notes.txt").write_text("not an image")
    masks = [write_mask(synthetic_root / "SegmentationClassAug" / f"{ids[0]}.png", cls, tmp_path / f"m{k}.png", 255)
             for k in range(3)]  # fmt: skip
    supports = ",".join(f"{synthetic_root}/JPEGImages/{ids[0]}.jpg" for _ in range(3))
    cfg = compose_tool("predict", [f"ckpt={ckpt}", f"support=[{supports}]", f"support_mask=[{','.join(map(str, masks))}]",
                                   f"query={queries}", f"out={tmp_path / 'out'}"], tmp_path)  # fmt: skip
    written = predict(cfg)
    assert [p.name for p in written] == [f"{q}_mask.png" for q in ids[1:]]
    for p in written:
        assert np.asarray(Image.open(p)).shape == (64, 64)


def test_a_frozen_backbone_computes_the_supports_once_for_all_queries(
    ckpt, synthetic_root, tmp_path, monkeypatch
):
    """Several queries with the same supports: the supports' backbone maps come from the feature
    cache after the first query, and the masks are those of predict without reuse."""
    import fewshotseg.predict as predict_module

    loaded = []

    def frozen(cfg):
        run_cfg, datamodule, module = load_run_frozen(cfg)
        module.method.backbone.requires_grad_(False)  # as a run with backbone.frozen=true
        loaded.append(module)
        return run_cfg, datamodule, module

    load_run_frozen = predict_module.load_model
    monkeypatch.setattr(predict_module, "load_model", frozen)
    ids = ["val_000000", "val_000001", "val_000002", "val_000003"]
    cls, queries = query_folder(synthetic_root, ids, tmp_path)
    mask = write_mask(synthetic_root / "SegmentationClassAug" / f"{ids[0]}.png", cls, tmp_path / "m.png", 255)
    masks = {}
    for reuse in ("false", "true"):
        cfg = compose_tool("predict", [f"ckpt={ckpt}", f"support=[{synthetic_root}/JPEGImages/{ids[0]}.jpg]",
                                       f"support_mask=[{mask}]", f"query={queries}", f"out={tmp_path / reuse}",
                                       f"feature_reuse.enabled={reuse}"], tmp_path)  # fmt: skip
        masks[reuse] = [np.asarray(Image.open(p)) for p in predict(cfg)]
    cache = loaded[-1].feature_cache
    assert loaded[0].feature_cache is None and cache.hits >= 2 and cache.misses >= 3, cache.summary()
    for a, b in zip(masks["false"], masks["true"], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("bad")
    image = synthetic_root / "JPEGImages" / "val_000000.jpg"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp / "empty.png")
    Image.fromarray(np.full((32, 64), 255, np.uint8)).save(tmp / "small.png")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp / "label.png")
    return tmp, image


@pytest.mark.parametrize(
    "change,message",
    [
        ({"support": "missing.jpg"}, r"image file not found: missing\.jpg"),
        (
            {"support_mask": "{tmp}/empty.png"},
            r"support_mask .*empty\.png is empty: expected the object marked",
        ),
        (
            {"support_mask": "{tmp}/small.png"},
            r"support_mask .*small\.png is 32x64 but its image .* is 64x64",
        ),
        ({"support_mask": "{tmp}/label.png"}, r"has values \[7\]: expected 0 background and 1 or 255 object"),
        (
            {"support_mask": "[{tmp}/small.png,{tmp}/empty.png]"},
            r"support= has 1 images but support_mask= has 2",
        ),
        ({"query": "{tmp}/nothing"}, r"query=.*nothing: no such image or folder"),
        ({"query": "{tmp}"}, None),  # a folder of masks only is fine (they are images)
        ({"class_name": "unicorn"}, r"class_name=unicorn: not a class of this dataset"),
        ({"ckpt": "none.ckpt"}, r"ckpt=none\.ckpt: no such checkpoint file"),
    ],
)
def test_bad_input_is_a_clear_error(ckpt, inputs, tmp_path, change, message):
    tmp, image = inputs
    args = {"ckpt": str(ckpt), "support": str(image), "support_mask": f"{tmp}/label.png", "query": str(image),
            "out": str(tmp_path / "out")}  # fmt: skip
    if "support_mask" not in change:
        args["support_mask"] = str(tmp_path / "ok.png")
        Image.fromarray(np.pad(np.ones((8, 8), np.uint8), 28)).save(args["support_mask"])
    args.update({k: v.format(tmp=tmp) for k, v in change.items()})
    cfg = compose_tool("predict", [f"{k}={v}" for k, v in args.items()], tmp_path)
    if message is None:
        assert len(predict(cfg)) == 3
        return
    with pytest.raises(UserInputError, match=message):
        predict(cfg)


def test_cli_error_is_one_line(ckpt, inputs, tmp_path):
    tmp, image = inputs
    proc = run_cli("fewshotseg.predict", f"ckpt={ckpt}", f"support=[{image}]", f"support_mask=[{tmp}/small.png]",
                   f"query={image}", f"paths.log_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fewshotseg: error: support_mask") and "32x64" in line
