"""The authors' checkpoints and the run outputs the tools rely on.

- Every method (discovered from conf/method/*.yaml), asked through its contract (methods/base.py):
  with a rename table, its state dict renamed to the authors' names and back (with DataParallel's
  `module.` prefix) loads with no missing key and gives identical logits; without one, `weights=` is
  a one-line error.
- `evaluate ... weights=<released file>` gives exactly the numbers of our own checkpoint; keys
  that do not map are a one-line error listing them.
- `train` writes results.json (the format of `evaluate`) and the per-class IoU CSV.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import pytest
import torch

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.errors import ConfigError
from fewshotseg.evaluate import evaluate
from fewshotseg.methods.base import method_class, without_stage_files
from fewshotseg.runs import build_run, load_official_weights, official_state
from helpers import TINY_OVERRIDES, compose_train_cfg, run_cli
from helpers.tiny_run import best_checkpoint, compose_tool, tiny_trained_run

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
# (method, backbone): each method on its configured backbone (the paper's, e.g. resnet50_psp), and
# PANet's released VGG-16 as well.
CASES = [(m, None) for m in METHODS] + [("panet", "vgg16_panet")]
SIZE = 65  # -> 9x9 features at output stride 8


def compose_method(method: str, backbone: str | None, tmp_path: Path, data_dir: Path):
    """The method as `train` composes it, with every module of the authors' checkpoints but without
    stage files (a stage's modules are built as when a checkpoint holds them: the contract's
    `Stage.restore`)."""
    overrides = [f"method={method}", f"data.test_transform.size={SIZE}"]
    cfg = compose_train_cfg(tmp_path, data_dir, overrides + ([f"backbone={backbone}"] if backbone else []))
    return without_stage_files(cfg)


def model_inputs(cfg, datamodule, semantic: bool) -> dict | torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if semantic:
        return torch.randn(2, 3, SIZE, SIZE, generator=g)
    K = int(cfg.shot)
    masks = torch.zeros(2, K, SIZE, SIZE, dtype=torch.long)
    masks[..., 10:50, 15:45] = 1
    masks[..., 0, :] = 255
    return {
        "query_img": torch.randn(2, 3, SIZE, SIZE, generator=g),
        "support_imgs": torch.randn(2, K, 3, SIZE, SIZE, generator=g),
        "support_masks": masks,
        "class_id": torch.tensor(datamodule.novel[:2]),
    }


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("method,backbone", CASES)
def test_official_names_round_trip(method, backbone, tmp_path, data_dir):
    cfg = compose_method(method, backbone, tmp_path, data_dir)
    table = method_class(cfg).official_names
    if table is None:  # no released checkpoint format: weights= says so in one line
        with pytest.raises(ConfigError, match="declares no official names"):
            official_state(cfg, tmp_path / "released.pth")
        return
    datamodule, module = build_run(cfg)
    model = module.method.eval()
    inputs = model_inputs(cfg, datamodule, method_class(cfg).task == "semantic")
    expected = logits_of(model, inputs)

    ours = {k: v.clone() for k, v in model.state_dict().items()}
    official = table.to_official(ours)
    back = table.to_ours({f"module.{k}": v for k, v in official.items()})  # DataParallel
    assert set(back) == set(ours)
    for value in model.state_dict().values():  # forget every weight, then load the round trip
        value.zero_()
    model.load_state_dict(back, strict=True)
    assert torch.equal(logits_of(model, inputs), expected)


def test_unmapped_keys_are_listed():
    panet = importlib.import_module("fewshotseg.methods.panet")
    asgnet = importlib.import_module("fewshotseg.methods.asgnet")
    with pytest.raises(ConfigError, match=r"decoder\.weight"):
        panet.convert_official_state({"module.encoder.backbone.features.0.0.weight": torch.zeros(1),
                                      "module.decoder.weight": torch.zeros(1)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"ASPP\.conv\.weight.*skip1\.0\.weight"):
        asgnet.convert_official_state({"ASPP.conv.weight": torch.zeros(1), "skip1.0.weight": torch.zeros(1)})
    # ASGNet's official model holds a layer4 that its forward never runs: dropped, not an error
    assert asgnet.convert_official_state({"module.layer4.0.conv1.weight": torch.zeros(1)}) == {}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    return tiny_trained_run(tmp_path_factory, data_dir)


def released_file(ckpt: Path, path: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """Our checkpoint as the authors would release it: official names, DataParallel prefix,
    wrapped in {'state_dict': ...}."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    method = {k[len("method.") :]: v for k, v in state.items() if k.startswith("method.")}
    official = importlib.import_module("fewshotseg.methods.panet").to_official_state(method)
    official = {f"module.{k}": v for k, v in official.items() if not (drop and k.endswith(drop))}
    if extra:
        official[extra] = torch.zeros(3)
    torch.save({"epoch": 3, "state_dict": official}, path)
    return path


def test_evaluate_a_released_checkpoint(tiny_run, data_dir, tmp_path):
    weights = released_file(best_checkpoint(tiny_run), tmp_path / "panet_released.pth")
    args = [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", "method=panet",
            "seed=3", "data.num_test_episodes=8", f"weights={weights}"]  # fmt: skip
    proc = run_cli("fewshotseg.evaluate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "logs" / "evaluate" / "runs").glob("*/results.json")
    got, trained = json.loads(results.read_text()), json.loads((tiny_run / "results.json").read_text())
    assert got["weights"] == str(weights) and got["ckpt"] is None
    assert got["runs"]["0"] == trained["runs"]["0"]  # the same model on the same episodes: same numbers
    assert got["run"] == trained["run"]


@pytest.mark.parametrize("drop,extra,message", [
    ("layer3.1.conv2.weight", None, r"lacks tensors .*: backbone\.body\.layer3\.1\.conv2\.weight; check"),
    (None, "module.classifier.weight", r"1 key\(s\) outside PANet's encoder: \['classifier\.weight'\]"),
])  # fmt: skip
def test_released_checkpoint_that_does_not_fit(tiny_run, data_dir, tmp_path, drop, extra, message):
    weights = released_file(best_checkpoint(tiny_run), tmp_path / "bad.pth", drop=drop, extra=extra)
    cfg = compose_train_cfg(tmp_path, data_dir, ["method=panet"])
    _, module = build_run(cfg)
    with pytest.raises(ConfigError, match=message):
        load_official_weights(module, cfg, weights)


def test_evaluate_errors(tmp_path):
    proc = run_cli("fewshotseg.evaluate", "weights=missing.pth", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["fewshotseg: error: weights=missing.pth: no such file"]
    for args, message in [
        ([], "no model: give ckpt="),
        (["ckpt=a.ckpt", "weights=b.pth"], "give ckpt=.* or method=.*, not both"),
        (["ckpt=a.ckpt", "method=asgnet"], "method= cannot be combined with ckpt="),
    ]:
        with pytest.raises(ConfigError, match=message):
            evaluate(compose_tool("evaluate", args, tmp_path))


def test_train_writes_results_json_and_per_class_csv(tiny_run):
    record = json.loads((tiny_run / "results.json").read_text())
    assert record["run"] == {"method": "panet", "backbone": "resnet18", "data": "synthetic", "fold": 0,
                             "shot": 1, "seed": 3, "protocol": None, "num_folds": 4}  # fmt: skip
    assert record["ckpt"].endswith(".ckpt") and set(record["runs"]) == {"0"}
    per_class = record["runs"]["0"]["iou_per_class"]
    miou = record["runs"]["0"]["miou"]
    assert record["summary"]["miou"] == {"mean": miou, "std": 0.0, "best": miou, "worst": miou, "n": 1}
    (table,) = (tiny_run / "csv").glob("version_*/test_iou_per_class.csv")
    assert (table.parent / "metrics.csv").is_file()  # next to metrics.csv
    with table.open() as fh:
        rows = {r["class"]: float(r["iou"]) for r in csv.DictReader(fh)}
    assert rows == pytest.approx(per_class) and rows  # the novel classes that had episodes
