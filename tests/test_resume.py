"""Resume: a run stopped mid-epoch and resumed ends exactly as the run that was never stopped; a
checkpoint of another fold is refused; SIGTERM leaves a checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from fewshotseg.errors import ConfigError
from fewshotseg.train import train
from helpers import TINY_OVERRIDES, compose_train_cfg

# 2 epochs of 4 steps, then the test on 4 episodes.
# The test scores the final weights (monitor=null: the "best" checkpoint is the latest).
TWO_EPOCHS = ["trainer.max_epochs=2", "test=true", "data.num_test_episodes=4", "callbacks.model_checkpoint.monitor=null",
              "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0"]  # fmt: skip


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, data_dir):
    whole = train(compose_train_cfg(tmp_path / "whole", data_dir, TWO_EPOCHS))

    # Stopped as SIGTERM stops it, after step 6 (the middle of epoch 2); KeepProgress writes last.ckpt.
    stop = ["+callbacks.stop._target_=helpers.stops.StopAtStep", "+callbacks.stop.step=6"]
    with pytest.raises(SystemExit) as stopped:
        train(compose_train_cfg(tmp_path / "cut", data_dir, [*TWO_EPOCHS, *stop]))
    assert stopped.value.code == 143
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert (state["global_step"], state["epoch"]) == (6, 1)

    # A fresh process would do exactly this: the same config, ckpt_path= the stopped run's last.ckpt.
    resumed = train(compose_train_cfg(tmp_path / "cut", data_dir, [*TWO_EPOCHS, f"ckpt_path={last}"]))
    assert resumed == whole  # test mIoU, FB-IoU and every class's IoU, exactly
    a, b = weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"), weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_fold(tmp_path, data_dir):
    train(compose_train_cfg(tmp_path / "a", data_dir, ["test=false"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = compose_train_cfg(tmp_path / "b", data_dir, ["test=false", "fold=1", f"ckpt_path={last}"])
    with pytest.raises(ConfigError, match=r"fold: 0 in the checkpoint, 1 here"):
        train(cfg)


def test_sigterm_writes_a_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    args = [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", "test=false",
            "trainer.max_epochs=1000", "trainer.limit_train_batches=1000",
            "+logger.csv.flush_logs_every_n_steps=1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "fewshotseg.train", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not list(run.glob("csv/*/metrics.csv")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)  # training has made a step once metrics.csv exists
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] >= 1
    assert "resume with ckpt_path=" in out
