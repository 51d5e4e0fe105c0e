"""Every bad input of the list is one line: `fewshotseg: error: ...` naming the key or the file, exit
code 2, no traceback. Run as a user would (subprocesses), on the tiny synthetic data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshotseg.run_folders import claim_folder
from helpers import TINY_OVERRIDES, compose_train_cfg, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_dir):
    """A checkpoint-like file of a fold-0 run, a file that is no checkpoint, a state dict with
    foreign keys, a support image with its mask, and a copy of the data with corrupt images."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = compose_train_cfg(root / "run", data_dir)
    torch.save({"fewshotseg_config": OmegaConf.to_container(cfg, resolve=True), "loops": {}, "state_dict": {}},
               root / "fold0.ckpt")  # fmt: skip
    (root / "not_a_checkpoint.ckpt").write_text("hello")
    torch.save({"foo.bar": torch.zeros(3)}, root / "foreign.pth")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(root / "a.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 1
    Image.fromarray(mask).save(root / "a_mask.png")
    shutil.copytree(data_dir, root / "corrupt")
    for image in (root / "corrupt").glob("*/JPEGImages/val_*.jpg"):
        image.write_text("not a jpeg")
    return root


def train_args(data_dir, tmp_path, *extra):
    return [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", *extra]


# (case, command line, a fragment the one line must hold)
CASES = [
    ("fold=abc", ["fold=abc"], "fold=abc: expected an integer in 0..3"),
    ("shot=abc", ["shot=abc"], "shot=abc: expected an integer >= 1"),
    ("shot=1.5", ["shot=1.5"], "shot=1.5: expected an integer >= 1"),
    ("fold=7", ["fold=7"], "fold=7 is out of range"),
    ("shot=0", ["shot=0"], "shot=0: expected an integer >= 1"),
    ("method=nosuch", ["method=nosuch"], "method=nosuch: no such option; expected one of"),
    ("sweep with an unknown method", ["-m", "method=panet,nosuch"], "method=nosuch: no such option"),
    ("unknown timm name", ["backbone=timm", "backbone.name=resnet18x"], "close names: resnet18"),
    ("resume another fold", ["ckpt_path={files}/fold0.ckpt", "fold=1"], "fold: 0 in the checkpoint, 1 here"),
    (
        "mistyped synthetic data.root",
        ["data.root={files}/typo"],
        "data.root={files}/typo: no synthetic benchmark",
    ),
    (
        "corrupt image, 2 workers",
        ["paths.data_dir={files}/corrupt", "data.num_workers=2"],
        "cannot read image",
    ),
]
EVALUATE_CASES = [
    (
        "evaluate seeds=abc",
        ["ckpt={files}/fold0.ckpt", "seeds=abc"],
        "seeds=abc: expected a list of integers",
    ),
    (
        "evaluate ckpt= not a checkpoint",
        ["ckpt={files}/not_a_checkpoint.ckpt"],
        "not_a_checkpoint.ckpt: cannot read",
    ),
    (
        "evaluate weights= foreign keys",
        ["method=panet", "weights={files}/foreign.pth"],
        "weights={files}/foreign.pth",
    ),
]


def assert_one_line(proc, fragment: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fewshotseg: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]


@pytest.mark.parametrize("case,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_train_bad_input_is_one_line(case, args, fragment, files, data_dir, tmp_path):
    args = [a.format(files=files) for a in args]
    proc = run_cli("fewshotseg.train", *train_args(data_dir, tmp_path, *args), cwd=tmp_path)
    assert_one_line(proc, fragment.format(files=files))
    if case.startswith("mistyped"):
        assert not (files / "typo").exists(), "no dataset generated at a mistyped data.root"


@pytest.mark.parametrize("case,args,fragment", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input_is_one_line(case, args, fragment, files, data_dir, tmp_path):
    args = [a.format(files=files) for a in args]
    extra = TINY_OVERRIDES if any(a.startswith("method=") for a in args) else ["trainer.accelerator=cpu"]
    proc = run_cli("fewshotseg.evaluate", *args, *extra, f"paths.data_dir={data_dir}",
                   f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)  # fmt: skip
    assert_one_line(proc, fragment.format(files=files))


def test_predict_not_a_checkpoint_is_one_line(files, tmp_path):
    proc = run_cli("fewshotseg.predict", f"ckpt={files}/not_a_checkpoint.ckpt", f"support=[{files}/a.png]",
                   f"support_mask=[{files}/a_mask.png]", f"query={files}/a.png", f"out={tmp_path / 'out'}",
                   cwd=tmp_path)  # fmt: skip
    assert_one_line(proc, "not_a_checkpoint.ckpt: cannot read")
    assert (tmp_path / "out" / ".hydra").is_dir()  # the run's own files go to out=


def test_predict_with_out_creates_no_other_folder(files, tmp_path):
    # OmegaConf dereferences hydra.run.dir while merging the config files, before out= applies:
    # the folder must not be claimed then
    run_cli("fewshotseg.predict", f"ckpt={files}/not_a_checkpoint.ckpt", f"support=[{files}/a.png]",
            f"support_mask=[{files}/a_mask.png]", f"query={files}/a.png", f"out={tmp_path / 'out'}",
            cwd=tmp_path)  # fmt: skip
    assert not (tmp_path / "logs").exists(), "out= is the only folder predict writes"


def test_claim_folder_never_shares(tmp_path):
    base = tmp_path / "runs" / "2026-01-01_00-00-00"
    claimed = [claim_folder(base) for _ in range(3)]
    assert claimed == [str(base), f"{base}_2", f"{base}_3"]
