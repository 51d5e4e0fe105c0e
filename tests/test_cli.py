"""The command line end to end: train -> checkpoint -> evaluate, resume, DDP, multirun, W&B offline,
and clear errors for bad input. Runs as a user would (subprocesses) on the tiny synthetic data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fewshotseg.train import train
from helpers import TINY_OVERRIDES, compose_train_cfg, run_cli


def cli_args(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", *extra]


def printed_metrics(stdout: str) -> tuple[float, float]:
    miou = float(re.search(r"test mIoU:\s+([\d.]+)", stdout).group(1))
    fbiou = float(re.search(r"test FB-IoU:\s+([\d.]+)", stdout).group(1))
    return miou, fbiou


def only_run_dir(tmp_path: Path, task: str = "train") -> Path:
    runs = sorted((tmp_path / "logs" / task / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_train_checkpoint_evaluate(tmp_path, data_dir):
    proc = run_cli("fewshotseg.train", *cli_args(tmp_path, data_dir, "seed=3"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    miou, fbiou = printed_metrics(proc.stdout)
    assert proc.stdout.strip().splitlines()[-1].startswith("test FB-IoU:")  # the last line
    run = only_run_dir(tmp_path)
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "overlays").glob("test_*.png")), "qualitative overlays are written"
    metrics_csv = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/miou" in metrics_csv and "test/miou" in metrics_csv and "test/iou/" in metrics_csv

    proc = run_cli("fewshotseg.evaluate", f"ckpt={best}", f"paths.log_dir={tmp_path / 'logs'}",
                   "data.num_workers=0", "seeds=[0,1]", "trainer.accelerator=cpu", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mIoU" in proc.stdout and "+-" in proc.stdout
    results = json.loads((only_run_dir(tmp_path, "evaluate") / "results.json").read_text())
    # Seed 0 is the training run's own test list: the same checkpoint gives the same numbers.
    assert 100 * results["runs"]["0"]["miou"] == pytest.approx(miou, abs=0.006)
    assert 100 * results["runs"]["0"]["fbiou"] == pytest.approx(fbiou, abs=0.006)
    assert set(results["summary"]) == {"miou", "fbiou", "iou_per_class", "best_seed"}


def test_resume_continues_at_the_right_step(tmp_path, data_dir):
    first = compose_train_cfg(tmp_path / "a", data_dir, ["trainer.max_epochs=1", "test=false"])
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and state["epoch"] == 0

    resumed = compose_train_cfg(
        tmp_path / "b", data_dir, ["trainer.max_epochs=2", "test=false", f"ckpt_path={last}"]
    )
    train(resumed)
    state2 = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state2["global_step"] == 8 and state2["epoch"] == 1  # 4 more steps, not 8 from scratch
    sched = state2["lr_schedulers"][0]
    assert sched["last_epoch"] == 8


def test_ddp_two_processes_equals_one_process(tmp_path, data_dir):
    # Train with DDP on 2 CPU processes (gloo), then test the same checkpoint with 1 and 2 processes.
    ddp = ["trainer=ddp", "trainer.devices=2", "data.num_test_episodes=15", "data.test_batch_size=1"]
    proc = run_cli("fewshotseg.train", *cli_args(tmp_path, data_dir, *ddp), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    results = {}
    for devices, strategy in [(1, "auto"), (2, "ddp")]:
        out = tmp_path / f"eval{devices}"
        proc = run_cli("fewshotseg.evaluate", f"ckpt={ckpt}", f"paths.log_dir={out}", "data.num_workers=0",
                       "data.test_batch_size=1", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                       f"+trainer.strategy={strategy}", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(next(out.glob("evaluate/runs/*/results.json")).read_text())["runs"]["0"]
    assert results[2] == results[1]  # exactly: every episode once, sums reduced across ranks


def test_multirun_two_jobs(tmp_path, data_dir):
    proc = run_cli(
        "fewshotseg.train",
        "-m",
        *cli_args(tmp_path, data_dir, "fold=0,1", "trainer.max_epochs=1"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "train" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert len(re.findall(r"test mIoU:", proc.stdout)) == 2


def test_wandb_offline_without_account(tmp_path, data_dir):
    # No account: no API key, no netrc, a fresh HOME, and no WANDB_MODE chosen by the user.
    env = {
        "WANDB_API_KEY": None,
        "WANDB_MODE": None,
        "NETRC": str(tmp_path / "no-netrc"),
        "HOME": str(tmp_path),
    }
    proc = run_cli("fewshotseg.train", *cli_args(tmp_path, data_dir, "logger=many", "trainer.max_epochs=1"),
                   cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs, "an offline W&B run folder is written"
    assert list(offline_runs[0].glob("*.wandb")), "with its run file"
    assert "wandb sync" in proc.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        ("method=nonexistent", r"method=nonexistent: no such option; expected one of all_foreground, asgnet"),
        ("fold=4", r"fold=4 is out of range: expected an integer in 0\.\.3"),
        ("shot=0", r"shot=0: expected an integer >= 1"),
        ("data.root=/nonexistent/VOC", r"/nonexistent/VOC does not exist"),
    ],
)
def test_bad_input_gives_clear_error(tmp_path, data_dir, override, message):
    if "data.root" in override:  # a real dataset: the synthetic-only overrides do not apply
        args = ["data=pascal", override, f"paths.log_dir={tmp_path / 'logs'}", "trainer.accelerator=cpu"]
    else:
        args = cli_args(tmp_path, data_dir, override)
    proc = run_cli("fewshotseg.train", *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher", ["local_parallel", "submitit_local_runs"])
def test_sweep_launchers(tmp_path, data_dir, launcher):
    # joblib (local parallel) and submitit's local executor (the SLURM code path, on this machine).
    args = cli_args(
        tmp_path, data_dir, "fold=0,1", "trainer.max_epochs=1", "test=false", f"hydra/launcher={launcher}"
    )
    proc = run_cli("fewshotseg.train", "-m", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "train" / "multiruns").iterdir())
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file(), sorted(
            p.name for p in sweep.rglob("*")
        )[:40]
