"""The package as users install it: a wheel, installed outside the source tree, runs its console
scripts with the configs it ships (no source checkout, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "fewshotseg-train",
    "fewshotseg-evaluate",
    "fewshotseg-predict",
    "fewshotseg-report",
    "fewshotseg-pretrain",
    "fewshotseg-pretrain-backbone",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed with --no-deps into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", str(work / "dist"), str(REPO)]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    wheel = next((work / "dist").glob("fewshotseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fewshotseg/conf/train.yaml" in names and "fewshotseg/conf/method/panet.yaml" in names
    target = work / "site"
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    return target


def run_installed(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # The installed copy comes first on the path, so the checkout's editable install is not used.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_wheel_ships_configs_and_console_scripts(installed, tmp_path):
    for script in SCRIPTS:
        assert (installed / "bin" / script).is_file(), script
    proc = run_installed(
        installed, [sys.executable, "-c", "import fewshotseg; print(fewshotseg.__file__)"], tmp_path
    )
    assert proc.stdout.strip().startswith(str(installed)), proc.stdout  # not the source checkout
    proc = run_installed(installed, [str(installed / "bin" / "fewshotseg-train"), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method:" in proc.stdout and "panet" in proc.stdout  # the config groups Hydra found


@pytest.mark.slow
def test_installed_train_runs_outside_the_source_tree(installed, tmp_path, data_dir):
    args = [*TINY_OVERRIDES, f"paths.data_dir={data_dir}"]  # logs default to ./logs under the cwd
    proc = run_installed(installed, [str(installed / "bin" / "fewshotseg-train"), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test mIoU:" in proc.stdout
    assert list((tmp_path / "logs" / "train" / "runs").glob("*/results.json"))
    # A user's own config folder is searched too: a new preset-like group option.
    own = tmp_path / "my_conf" / "trainer"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("defaults:\n  - default\ngradient_clip_val: 0.5\n")
    proc = run_installed(
        installed,
        [str(installed / "bin" / "fewshotseg-train"), f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
         "trainer=mine", "--cfg", "job", "--package", "trainer"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient_clip_val: 0.5" in proc.stdout
