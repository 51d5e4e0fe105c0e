"""A run whose loss turns NaN stops (StopOnDivergence), tests the checkpoint from before, and says so
in results.json; a loss that recovers within the patience does not stop it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch

from fewshotseg.callbacks import StopOnDivergence
from fewshotseg.train import train
from helpers import compose_train_cfg


def feed(callback: StopOnDivergence, losses: list[float]) -> SimpleNamespace:
    trainer = SimpleNamespace(global_step=0, should_stop=False, optimizers=[])
    for loss in losses:
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)
    return trainer


def test_stops_after_patience_non_finite_steps_in_a_row():
    nan, inf = math.nan, math.inf
    assert not feed(StopOnDivergence(patience=3), [1.0, nan, nan, 0.5, inf, nan, 0.4]).should_stop
    callback = StopOnDivergence(patience=3)
    trainer = feed(callback, [1.0, nan, inf, nan, nan])
    assert trainer.should_stop and callback.stopped_at == 4


def test_a_diverged_run_stops_and_its_record_says_so(tmp_path, data_dir):
    # 3 epochs of 4 steps; every weight NaN before step 6 (the second of epoch 2), patience 2:
    # training stops after step 7, validates, and the test scores epoch 1's checkpoint.
    overrides = [
        "trainer.max_epochs=3", "test=true", "data.num_test_episodes=4", "trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0", "callbacks.stop_on_divergence.patience=2",
        "+callbacks.poison._target_=helpers.stops.PoisonAtStep", "+callbacks.poison.step=5",
    ]  # fmt: skip
    results = train(compose_train_cfg(tmp_path, data_dir, overrides))
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    steps = [int(row.split(",")[header.index("step")]) for row in metrics[1:]]
    assert max(steps) <= 7  # nothing logged after the stop
    assert math.isfinite(results["miou"])
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["how"]["selection"].endswith("training stopped at step 7: the loss was not finite")
    assert "epoch000" in record["ckpt"]  # the checkpoint from before the divergence
