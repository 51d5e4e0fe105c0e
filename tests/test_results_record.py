"""results.json says how a number was obtained, and `report` keeps numbers obtained differently
apart: the recorded fields (train and evaluate, end to end on a tiny run), mean / best / sample std
over test seeds, tables per protocol, duplicate runs of a cell, means over fewer folds, old records."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
import torch

from fewshotseg.evaluate import evaluate
from fewshotseg.report import report
from fewshotseg.results import HOW_FIELDS, summarise
from helpers.tiny_run import best_checkpoint, compose_tool, tiny_trained_run

HOW = {
    "protocol": "pfenet", "test_split": "val", "test_input": "longer side to 473 (aspect kept), padded to 473 x 473",
    "scored_at": "original", "episodes": 1000, "test_order": "image", "fold_split": "consecutive",
    "test_seeds": [0], "selection": "best validation mIoU on held-out episodes", "training": "16 epochs, batch 8",
    "novel_images_in_train": "kept as background", "backbone_training": "from random init, frozen, BN eval",
    "class_name_table": None, "precision": "32-true",
}  # fmt: skip


def record(tmp_path: Path, name: str, miou, fold=0, seed=1, method="pfenet", how=None, num_folds=4,
           drop=()) -> Path:  # fmt: skip
    """A results.json with per-seed mIoU `miou` (a float or one per test seed)."""
    values = miou if isinstance(miou, list) else [miou]
    runs = {s: {"miou": v, "fbiou": v + 0.1, "iou_per_class": {"a": v}} for s, v in enumerate(values)}
    how = {**HOW, "test_seeds": list(runs), **(how or {})}
    for key in drop:
        del how[key]
    rec = {"run": {"method": method, "backbone": "resnet50_psp", "data": "pascal", "fold": fold, "shot": 1,
                   "seed": seed, "protocol": how.get("protocol"), "num_folds": num_folds},
           "how": how, "runs": runs, "summary": summarise(runs)}  # fmt: skip
    path = tmp_path / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    return path


def test_summary_mean_best_and_sample_std():
    values = [0.61, 0.58, 0.655, 0.6]
    runs = {
        s: {"miou": v, "fbiou": 1 - v, "iou_per_class": {"a": v, "b": 2 * v}}
        for s, v in zip((3, 5, 8, 13), values)
    }
    summary = summarise(runs)
    n = len(values)
    mean = sum(values) / n
    assert summary["miou"]["mean"] == pytest.approx(mean)
    assert summary["miou"]["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5)
    assert summary["miou"]["best"] == 0.655 and summary["miou"]["worst"] == 0.58 and summary["best_seed"] == 8
    assert summary["fbiou"]["best"] == pytest.approx(0.42)  # the best of each metric on its own
    assert summary["iou_per_class"]["b"]["best"] == pytest.approx(1.31)


def test_two_protocols_make_two_tables(tmp_path):
    record(tmp_path, "pfenet", 0.60)
    record(tmp_path, "hsnet", 0.70, how={"protocol": "hsnet", "test_input": "squash-resize to 400 x 400",
                                         "scored_at": "input", "test_order": "pair"})  # fmt: skip
    result = report([tmp_path], tmp_path / "out", plots=False)
    md = result["markdown"]
    assert md.count("## pascal (protocol: pfenet)") == 1 and md.count("## pascal (protocol: hsnet)") == 1
    assert md.count("| method | backbone | shot |") == 2 * 2  # mIoU and FB-IoU tables of each
    (hsnet,) = [part for part in md.split("## ") if part.startswith("pascal (protocol: hsnet)")]
    assert "70.00" in hsnet and "60.00" not in hsnet
    assert "- test input: squash-resize to 400 x 400" in md and "- scored at: original" in md


@pytest.mark.parametrize("field,value", [("episodes", 5000), ("test_seeds", [0, 1]), ("precision", "bf16-mixed"),
                                         ("selection", "the final weights, no selection"),
                                         ("training", "32 epochs, batch 8"),
                                         ("novel_images_in_train", "excluded")])  # fmt: skip
def test_any_recorded_difference_splits_the_table(tmp_path, field, value):
    record(tmp_path, "a", 0.60)
    record(tmp_path, "b", 0.62, fold=1, how={field: value})
    md = report([tmp_path], tmp_path / "out", plots=False)["markdown"]
    assert md.count("## pascal") == 2


def test_backbone_training_and_class_names_label_rows_of_one_table(tmp_path):
    """The papers' regime beside from scratch: one table, a row each, labelled; likewise a method's
    class-name table, shown next to the method."""
    record(tmp_path, "scratch", 0.30, how={"backbone_training": "from random init, trained, BN train"})
    record(
        tmp_path, "frozen", 0.80, how={"backbone_training": "from resnet18_synthetic.pth, frozen, BN eval"}
    )
    record(tmp_path, "names", 0.85, method="symnet", how={"class_name_table": "word2vec.pkl"})
    md = report([tmp_path], tmp_path / "out", plots=False)["markdown"]
    assert md.count("## pascal") == 1
    assert "| pfenet | resnet50_psp (from random init, trained, BN train) | 1 | 30.00 |" in md
    assert "| pfenet | resnet50_psp (from resnet18_synthetic.pth, frozen, BN eval) | 1 | 80.00 |" in md
    assert "| symnet (word2vec.pkl) | resnet50_psp (from random init, frozen, BN eval) | 1 | 85.00 |" in md
    header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("shot") + 1 : header.index("shot") + 3] == [
        "class_name_table",
        "backbone_training",
    ]


def test_duplicate_runs_of_a_cell_are_kept_with_a_warning(tmp_path, caplog):
    a = record(tmp_path, "a", 0.60, seed=1)
    b = record(tmp_path, "b", 0.64, seed=1)  # the same cell and training seed again
    with caplog.at_level(logging.WARNING, logger="fewshotseg.report"):
        result = report([tmp_path], tmp_path / "out", plots=False)
    assert any(str(a) in w and str(b) in w and "2 runs" in w for w in result["warnings"])
    assert any("fold 0, training seed 1: 2 runs" in r.getMessage() for r in caplog.records)
    # both kept: mean and sample std of the two
    cell = f"{100 * statistics.fmean([0.60, 0.64]):.2f} ± {100 * statistics.stdev([0.60, 0.64]):.2f}"
    assert cell in result["markdown"] and "## Warnings" in result["markdown"]


def test_mean_over_fewer_folds_is_marked_and_std_is_sample_std(tmp_path):
    for fold in (0, 1):
        for seed, v in ((1, 0.5 + 0.1 * fold), (2, 0.56 + 0.1 * fold), (3, 0.53 + 0.1 * fold)):
            record(tmp_path, f"f{fold}s{seed}", v, fold=fold, seed=seed)
    result = report([tmp_path], tmp_path / "out", plots=False)
    md = result["markdown"]
    assert "(2 of 4 folds)" in md
    per_seed = [statistics.fmean([0.5 + d, 0.6 + d]) for d in (0.0, 0.06, 0.03)]
    assert f"**{100 * statistics.fmean(per_seed):.2f} ± {100 * statistics.stdev(per_seed):.2f}**" in md
    fold0 = [0.5, 0.56, 0.53]
    assert f"{100 * statistics.fmean(fold0):.2f} ± {100 * statistics.stdev(fold0):.2f}" in md
    csv_text = (tmp_path / "out" / "report.csv").read_text()
    assert ",2,4," in csv_text  # folds_in_mean, dataset_folds
    for fold in (2, 3):
        for seed in (1, 2, 3):
            record(tmp_path, f"g{fold}s{seed}", 0.5, fold=fold, seed=seed)
    assert "of 4 folds" not in report([tmp_path], tmp_path / "out2", plots=False)["markdown"]


def test_mean_or_best_seed_cells_are_labelled(tmp_path):
    record(tmp_path, "a", [0.50, 0.58, 0.54])
    mean = report([tmp_path], tmp_path / "m", plots=False)["markdown"]
    best = report([tmp_path], tmp_path / "b", plots=False, seed_stat="best")["markdown"]
    assert "54.00" in mean and "each cell: the mean over the run's test seeds" in mean
    assert "58.00" in best and "each cell: the run's best test seed" in best


def test_a_record_without_the_fields_is_flagged(tmp_path):
    record(tmp_path, "old", 0.6, drop=("precision", "selection"))
    result = report([tmp_path], tmp_path / "out", plots=False)
    assert any("lacks selection, precision" in w for w in result["warnings"])
    assert "- precision: unrecorded" in result["markdown"]


# End to end: the fields train and evaluate record, and evaluate's mean and best
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    return tiny_trained_run(tmp_path_factory, data_dir)


def test_train_records_how_it_was_obtained(tiny_run):
    how = json.loads((tiny_run / "results.json").read_text())["how"]
    assert set(how) == set(HOW_FIELDS)
    assert how["protocol"] is None and how["test_split"] == "val" and how["scored_at"] == "input"
    assert how["test_input"] == "squash-resize to 57 x 57" and how["episodes"] == 8
    assert how["test_seeds"] == [0] and how["precision"] == "32-true" and how["class_name_table"] is None
    assert how["selection"] == "best validation mIoU on held-out episodes"
    assert how["novel_images_in_train"] == "kept as background" and how["test_order"] == "image"
    assert how["backbone_training"] == "from random init, trained, BN eval"
    assert how["training"] == "1 epoch, batch 2, 4 batches per epoch", how["training"]


def test_evaluate_prints_and_records_mean_and_best(tiny_run, tmp_path, data_dir, capsys):
    ckpt = best_checkpoint(tiny_run)
    summary = evaluate(compose_tool("evaluate", [f"ckpt={ckpt}", f"paths.log_dir={tmp_path}", "seeds=[0,1,2]",
                                                 "data.num_workers=0", "trainer.accelerator=cpu"], tmp_path))  # fmt: skip
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "results.json").read_text())
    per_seed = [rec["runs"][s]["miou"] for s in ("0", "1", "2")]
    assert rec["summary"]["miou"]["best"] == max(per_seed) == summary["miou"]["best"]
    assert rec["summary"]["miou"]["std"] == pytest.approx(statistics.stdev(per_seed))
    assert rec["how"]["test_seeds"] == [0, 1, 2]
    assert rec["how"]["selection"] == "best validation mIoU on held-out episodes"
    train_how = json.loads((tiny_run / "results.json").read_text())["how"]
    assert rec["how"]["training"] == train_how["training"]  # read back from the checkpoint's config
    assert rec["how"]["backbone_training"] == train_how["backbone_training"]
    assert f"mean {100 * statistics.fmean(per_seed):.2f}" in out and f"{100 * max(per_seed):.2f}" in out
    assert "best seed" in out and "sample std" in out


def test_evaluate_records_the_start_the_checkpoint_names(tiny_run, tmp_path):
    """A run on a weight file: evaluate rebuilds the backbone without that file (the tensors come from
    the checkpoint), so the record names the start the checkpoint stored, not a rebuilt one."""
    ckpt = torch.load(best_checkpoint(tiny_run), map_location="cpu", weights_only=True)
    assert ckpt["backbone_start"] == "random init"  # what training recorded
    ckpt["backbone_start"] = "resnet18_synthetic.pth (sha256 0123abcd)"
    torch.save(ckpt, tmp_path / "on_a_file.ckpt")
    evaluate(compose_tool("evaluate", [f"ckpt={tmp_path / 'on_a_file.ckpt'}", f"paths.log_dir={tmp_path}",
                                       "data.num_workers=0", "trainer.accelerator=cpu"], tmp_path))  # fmt: skip
    how = json.loads((tmp_path / "results.json").read_text())["how"]
    assert how["backbone_training"] == "from resnet18_synthetic.pth (sha256 0123abcd), trained, BN eval"


def test_selection_last_and_a_run_with_nothing_to_train(tmp_path, data_dir, caplog):
    from fewshotseg.train import train
    from helpers import compose_train_cfg

    short = ["test=true", "data.num_test_episodes=4", "trainer.limit_train_batches=2",
             "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0"]  # fmt: skip
    train(compose_train_cfg(tmp_path / "last", data_dir, [*short, "selection=last"]))
    rec = json.loads((tmp_path / "last" / "results.json").read_text())
    assert rec["ckpt"] is None and rec["how"]["selection"] == "the final weights, no selection"
    assert rec["how"]["training"].endswith(", 2 batches per epoch")
    # PANet on a frozen backbone has no weight to train: no fit, a warning, a test of the weights as built
    with caplog.at_level(logging.WARNING, logger="fewshotseg.train"):
        train(compose_train_cfg(tmp_path / "frozen", data_dir, [*short, "backbone.frozen=true"]))
    assert any("no trainable parameter" in r.getMessage() for r in caplog.records)
    rec = json.loads((tmp_path / "frozen" / "results.json").read_text())
    assert rec["how"]["selection"].endswith("(no checkpoint: the final weights)")
    assert rec["how"]["training"] == "none"
    train(compose_train_cfg(tmp_path / "untrained", data_dir, [*short, "trainer.max_epochs=0"]))
    rec = json.loads((tmp_path / "untrained" / "results.json").read_text())
    assert rec["how"]["training"] == "none"
