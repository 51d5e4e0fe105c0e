"""checkpoints.py: one reader for weight files and the package's own Lightning checkpoints."""

import pytest
import torch

from fewshotseg import checkpoints
from fewshotseg.backbones import Backbone
from fewshotseg.errors import ConfigError


def _backbone():
    return Backbone(name="resnet18", levels=[1, 2], output_stride=32)


def test_package_lightning_checkpoint_loads_as_backbone_weights(tmp_path):
    source = _backbone()
    state = {f"method.backbone.body.{k}": v for k, v in source.body.state_dict().items()}
    state["method.head.weight"] = torch.zeros(2)
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": state, "fewshotseg_config": {"fold": 0}, "epoch": 3}, path)
    loaded = Backbone(name="resnet18", levels=[1, 2], output_stride=32, weights=str(path))
    for k, v in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[k], v), k


def test_the_recorded_start_names_the_weights_by_their_tensors(tmp_path):
    source = _backbone()
    torch.save(source.body.state_dict(), tmp_path / "a.pth")
    torch.save({"state_dict": {f"method.backbone.body.{k}": v for k, v in source.body.state_dict().items()}},
               tmp_path / "best.ckpt")  # fmt: skip
    a, ckpt = (Backbone(name="resnet18", levels=[1, 2], output_stride=32, weights=str(tmp_path / f))
               for f in ("a.pth", "best.ckpt"))  # fmt: skip
    digest = a.start.removeprefix("a.pth (sha256 ").removesuffix(")")
    assert len(digest) == 8 and ckpt.start == f"best.ckpt (sha256 {digest})"  # same tensors, other file
    shallow = Backbone(name="resnet18", levels=[1], output_stride=32, weights=str(tmp_path / "a.pth"))
    assert len(shallow.body.state_dict()) < len(a.body.state_dict())  # blocks past level 1 are dropped
    assert shallow.start == a.start  # the digest names the file's tensors, not the ones a method keeps
    changed = source.body.state_dict()
    changed["bn1.running_mean"] = changed["bn1.running_mean"] + 1e-3  # BN statistics count too
    torch.save(changed, tmp_path / "a.pth")
    other = Backbone(name="resnet18", levels=[1, 2], output_stride=32, weights=str(tmp_path / "a.pth"))
    assert other.start.startswith("a.pth (sha256 ") and digest not in other.start
    assert other.training_regime == f"from {other.start}, trained, BN eval"


def test_module_prefix_and_wrappers_are_removed(tmp_path):
    path = tmp_path / "dp.pth"
    torch.save({"model": {"module.conv1.weight": torch.ones(1)}}, path)
    assert list(checkpoints.read_state_dict(path)) == ["conv1.weight"]
    assert checkpoints.strip_prefix({"a.b": 1, "module.c": 2}) == {"a.b": 1, "c": 2}


def test_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.arange(3.0)}, str(path))
    assert torch.equal(checkpoints.read_state_dict(path)["conv1.weight"], torch.arange(3.0))


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^weights=.*nope\.pth: no such file$"):
        checkpoints.read(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^backbone\.weights=.*bad\.pth: cannot read it") as err:
        Backbone(name="resnet18", levels=[1], output_stride=32, weights=str(bad))
    assert "\n" not in str(err.value)


def test_mismatch_report():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "bn.num_batches_tracked": torch.zeros(())}
    report = checkpoints.mismatch(own, {"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1)})
    assert report == ([], ["c"], ["b"]) and report
    assert not checkpoints.mismatch(own, {"a": torch.zeros(2), "b": torch.zeros(3)})
    assert checkpoints.mismatch(own, dict(own), ignore_bn_counts=False) == ([], [], [])
