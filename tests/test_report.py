"""`python -m fewshotseg.report` on a real sweep (train -m fold=0,1 shot=1,2 seed=1,2, untrained
models tested on 8 episodes each): every cell holds its runs' own mIoU, the mean column their mean."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from fewshotseg.errors import ConfigError
from fewshotseg.report import report
from helpers import TINY_OVERRIDES, run_cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    args = [*TINY_OVERRIDES, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp / 'logs'}",
            "trainer.max_epochs=0", "data.num_test_episodes=8", "fold=0,1", "shot=1,2", "seed=1,2"]  # fmt: skip
    proc = run_cli("fewshotseg.train", "-m", *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((tmp / "logs" / "train" / "multiruns").iterdir())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_sweep_table_reproduces_every_run(sweep, tmp_path):
    files = sorted(sweep.rglob("results.json"))
    assert len(files) == 8
    by_cell: dict[tuple[int, int], list[float]] = {}
    for f in files:
        record = read(f)
        run = record["run"]
        assert (run["method"], run["backbone"], run["data"]) == ("panet", "resnet18", "synthetic")
        assert list(record["runs"]) == ["0"]  # the run's own test (test_seed 0)
        assert record["summary"]["miou"]["mean"] == record["runs"]["0"]["miou"]
        by_cell.setdefault((run["shot"], run["fold"]), []).append(record["runs"]["0"]["miou"])

    result = report([sweep], tmp_path / "report")
    with (tmp_path / "report" / "report.csv").open() as fh:
        rows = {(int(r["shot"]), r["metric"]): r for r in csv.DictReader(fh)}
    assert {k for k in rows} == {(s, m) for s in (1, 2) for m in ("miou", "fbiou")}
    for shot in (1, 2):
        row = rows[(shot, "miou")]
        assert int(row["runs"]) == 4
        for fold in (0, 1):
            values = by_cell[(shot, fold)]
            assert len(values) == 2  # two seeds
            assert float(row[f"fold{fold}"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert float(row[f"fold{fold}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
        fold_means = [statistics.fmean(by_cell[(shot, f)]) for f in (0, 1)]
        assert float(row["mean"]) == pytest.approx(statistics.fmean(fold_means), abs=1e-6)
        assert row["fold2"] == row["fold3"] == ""  # folds without runs stay empty
        # the Markdown cell: mean +- std in %
        fold0 = by_cell[(shot, 0)]
        cell = f"{100 * statistics.fmean(fold0):.2f} ± {100 * statistics.stdev(fold0):.2f}"
        assert cell in result["markdown"]
    assert "| panet | resnet18 (from random init, trained, BN eval) | 1 |" in result["markdown"]
    assert "**FB-IoU**" in result["markdown"]
    pngs = [p for p in result["files"] if p.suffix == ".png"]
    assert {p.name for p in pngs} == {
        "miou_per_fold_synthetic_default.png",
        "iou_per_class_synthetic_default.png",
    }
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_extra_metrics_and_single_seed_cells(sweep, tmp_path):
    # A method that reports more (Sym-Net's meta_miou): its column appears, the others stay intact.
    extra = tmp_path / "extra" / "results.json"
    extra.parent.mkdir()
    record = read(next(sweep.rglob("results.json")))
    record["run"].update(method="symnet", seed=7)
    record["summary"]["meta_miou"] = {"mean": 0.4321, "std": 0.0}
    extra.write_text(json.dumps(record))
    result = report([extra], tmp_path / "out", plots=False)
    assert "**meta_miou**" in result["markdown"] and "43.21" in result["markdown"]
    table = [line for line in result["markdown"].splitlines() if line.startswith("|")]
    assert table and not any("±" in line for line in table)  # one run per cell: no std


def test_cli_and_bad_folder(sweep, tmp_path):
    proc = run_cli("fewshotseg.report", str(sweep), "--out", str(tmp_path / "r"), "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| method | backbone | shot | fold 0 | fold 1 | fold 2 | fold 3 | mean |" in proc.stdout
    assert (tmp_path / "r" / "report.md").is_file()
    with pytest.raises(ConfigError, match="no results.json"):
        report([tmp_path / "r"], tmp_path / "x")
    proc = run_cli("fewshotseg.report", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fewshotseg: error: {tmp_path / 'nope'}: no such run or sweep folder"
    ]
