"""The quickstart notebook executes (nbclient, tiny settings, no network): episodes, a prediction
on an image and a report, with the session's tiny trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers.tiny_run import best_checkpoint, tiny_trained_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, tmp_path_factory, data_dir, monkeypatch):
    ckpt = best_checkpoint(tiny_trained_run(tmp_path_factory, data_dir))
    monkeypatch.setenv("FEWSHOTSEG_QUICKSTART_TINY", "1")
    monkeypatch.setenv("FEWSHOTSEG_QUICKSTART_DATA", str(data_dir))
    monkeypatch.setenv("FEWSHOTSEG_QUICKSTART_WORK", str(tmp_path))
    monkeypatch.setenv("FEWSHOTSEG_QUICKSTART_CKPT", str(ckpt))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the episodes, the prediction, the chart
    assert any("| method | backbone | shot |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert list((tmp_path / "predictions").glob("*_mask.png"))
    assert os.listdir(tmp_path / "report")
