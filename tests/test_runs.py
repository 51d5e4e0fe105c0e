"""Run folders: two runs started at once never share one, and a resumed run continues in its own
folder (its checkpoints, its best score, its logs). Runs as a user would (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from fewshotseg.run_folders import run_dir
from helpers import SHORT, TINY_OVERRIDES


def test_resumed_folder_is_the_checkpoints_run(tmp_path):
    run = tmp_path / "runs" / "a"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    base = str(tmp_path / "runs" / "new")
    assert run_dir(base, str(run / "checkpoints" / "last.ckpt")) == str(run)
    assert run_dir(base, str(run / "checkpoints" / "last.ckpt"), resume_in_place=False) == base
    assert run_dir(base, str(tmp_path / "elsewhere.ckpt")) == f"{base}_2"  # not a run's: a new folder


def test_two_runs_at_once_keep_their_folders_then_one_resumes_in_place(tmp_path, data_dir):
    # Both claim the same folder name at once, as two runs started in the same second do.
    same = f"hydra.run.dir=${{fss.run_dir:'{tmp_path}/runs/same'}}"
    args = [*TINY_OVERRIDES, *SHORT, f"paths.data_dir={data_dir}", same]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fewshotseg.train", *args, f"fold={fold}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for fold in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["same", "same_2"]
    folds = sorted(json.loads((f / "results.json").read_text())["run"]["fold"] for f in folders)
    assert folds == [0, 1]

    # Resume one of them: it continues in its own folder, under the same run.
    run = folders[0]
    last = run / "checkpoints" / "last.ckpt"
    fold = torch.load(last, map_location="cpu", weights_only=True)["fewshotseg_config"]["fold"]
    resume = [*TINY_OVERRIDES, *SHORT, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}",
              f"fold={fold}", "trainer.max_epochs=2", f"ckpt_path={last}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fewshotseg.train", *resume], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "logs").exists(), "no new run folder"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4  # 2 + 2 steps
    assert list(run.glob(".hydra/resumed_*/overrides.yaml")) and (run / ".hydra" / "config.yaml").is_file()
    assert (run / "csv" / "version_1" / "metrics.csv").is_file()
    assert (run / "train.log").stat().st_size > 0
