"""Backbones: PSPNet deep-base ResNet (dilation, output stride, PSPNet key remap), PANet's VGG-16
(layout, stride, parameters, torchvision keys), freezing and BatchNorm modes. CPU, random weights;
the big-input shape checks run on the meta device (shapes only, no compute)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F

from fewshotseg.backbones import Backbone
from fewshotseg.errors import ConfigError
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.panet import PANet

# ------------------------------------------------------------------------------------------------
# PSPNet deep-base ResNet
# ------------------------------------------------------------------------------------------------


def test_psp_dilation_every_block_and_output_stride_8():
    with torch.device("meta"):
        b = Backbone("resnet50_psp", levels=[1, 2, 3, 4])
        timm_os8 = timm.create_model("resnet50s", features_only=True, output_stride=8)
        feats = b(torch.empty(1, 3, 473, 473))
        coco = b(torch.empty(1, 3, 641, 641))
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for i, block in enumerate(getattr(b.body, stage)):
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d), (stage, i)
            assert block.conv2.stride == (1, 1)
        assert getattr(b.body, stage)[0].downsample[0].stride == (1, 1)
    # timm's own OS8 gives the first block the previous dilation: the surgery is needed
    assert timm_os8.layer3[0].conv2.dilation == (1, 1) and timm_os8.layer4[0].conv2.dilation == (2, 2)
    assert b.body.layer2[0].conv2.stride == (2, 2) and b.body.layer2[0].conv2.dilation == (1, 1)
    assert b.channels == {1: 256, 2: 512, 3: 1024, 4: 2048}
    assert b.reduction == {1: 4, 2: 8, 3: 8, 4: 8}
    assert feats[1].shape[-2:] == (119, 119)
    for level in (2, 3, 4):
        assert feats[level].shape[-2:] == (60, 60)
        assert coco[level].shape[-2:] == (81, 81)
    # deep stem 64-64-128, plain strided shortcut
    assert [b.body.conv1[i].out_channels for i in (0, 3, 6)] == [64, 64, 128]
    assert b.body.conv1[0].stride == (2, 2)


def _bn(m, x):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def pspnet_reference(body, x):
    """PSPNet's ResNet written out with explicit convs: stride 2 in layer2's first block, every
    block of layer3 / layer4 with stride 1 and dilation 2 / 4 (never reading the modules' own
    stride/dilation attributes)."""
    s = body.conv1
    x = F.relu(_bn(s[1], F.conv2d(x, s[0].weight, stride=2, padding=1)))
    x = F.relu(_bn(s[4], F.conv2d(x, s[3].weight, padding=1)))
    x = F.relu(_bn(body.bn1, F.conv2d(x, s[6].weight, padding=1)))
    x = F.max_pool2d(x, 3, 2, 1)
    out = {}
    for stage, stride, d in (("layer1", 1, 1), ("layer2", 2, 1), ("layer3", 1, 2), ("layer4", 1, 4)):
        for i, blk in enumerate(getattr(body, stage)):
            st = stride if i == 0 else 1
            y = F.relu(_bn(blk.bn1, F.conv2d(x, blk.conv1.weight)))
            y = F.relu(_bn(blk.bn2, F.conv2d(y, blk.conv2.weight, stride=st, padding=d, dilation=d)))
            y = _bn(blk.bn3, F.conv2d(y, blk.conv3.weight))
            short = (
                x
                if blk.downsample is None
                else _bn(blk.downsample[1], F.conv2d(x, blk.downsample[0].weight, stride=st))
            )
            x = F.relu(y + short)
        out[stage] = x
    return out


def test_psp_matches_independent_reference():
    torch.manual_seed(0)
    b = Backbone("resnet50_psp", levels=[2, 3, 4], bn_mode="eval").double().eval()
    for m in b.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        got, ref = b(x), pspnet_reference(b.body, x)
    for level, layer in ((2, "layer2"), (3, "layer3"), (4, "layer4")):
        assert got[level].shape[-2:] == (5, 5)
        torch.testing.assert_close(got[level], ref[layer], rtol=1e-9, atol=1e-9)


PSP_STEM = {
    "conv1.0": "conv1",
    "conv1.1": "bn1",
    "conv1.3": "conv2",
    "conv1.4": "bn2",
    "conv1.6": "conv3",
    "bn1": "bn3",
}


def fake_pspnet_state(with_tracked=True):
    """A state dict with hszhao/semseg's PSPNet ResNet-50 names and shapes (plus fc), random values."""
    with torch.device("meta"):
        timm_state = timm.create_model("resnet50s").state_dict()
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, t in timm_state.items():
        tracked = key.endswith("num_batches_tracked")
        if tracked and not with_tracked:  # old PyTorch files have none
            continue
        head, _, rest = key.rpartition(".")
        name = f"{PSP_STEM[head]}.{rest}" if head in PSP_STEM else key  # layerN.i.* and fc.* as they are
        state[name] = torch.tensor(7) if tracked else torch.randn(t.shape, generator=g)
    return state


@pytest.mark.parametrize("with_tracked", [True, False])
def test_psp_key_remap_from_pspnet_checkpoint(tmp_path, with_tracked, caplog):
    state = fake_pspnet_state(with_tracked)
    assert {"conv1.weight", "bn3.running_var", "conv3.weight", "fc.weight", "layer4.2.bn3.bias"} <= set(state)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    b = Backbone("resnet50_psp", levels=[2, 3], weights=str(path))
    body = b.body
    assert torch.equal(body.conv1[0].weight, state["conv1.weight"])
    assert torch.equal(body.conv1[1].running_mean, state["bn1.running_mean"])
    assert torch.equal(body.conv1[3].weight, state["conv2.weight"])
    assert torch.equal(body.conv1[4].bias, state["bn2.bias"])
    assert torch.equal(body.conv1[6].weight, state["conv3.weight"])
    assert torch.equal(body.bn1.running_var, state["bn3.running_var"])
    for key, value in body.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        head, _, rest = key.rpartition(".")
        src = f"{PSP_STEM[head]}.{rest}" if head in PSP_STEM else key
        assert torch.equal(value, state[src]), key
    assert "lacks" not in caplog.text  # nothing left at init


def test_psp_loads_pfenet_model_layout_and_rejects_wrong_shapes(tmp_path, caplog):
    state = fake_pspnet_state()
    stem = {
        "conv1": "layer0.0",
        "bn1": "layer0.1",
        "conv2": "layer0.3",
        "bn2": "layer0.4",
        "conv3": "layer0.6",
        "bn3": "layer0.7",
    }
    model_state = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        model_state["module." + (f"{stem[head]}.{rest}" if head in stem else key)] = value
    model_state["module.down_conv.0.weight"] = torch.zeros(256, 1536, 1, 1)  # head tensors are ignored
    del model_state["module.layer1.0.bn1.weight"]  # reported, left at init
    torch.save({"state_dict": model_state}, tmp_path / "asgnet.pth")
    b = Backbone("resnet50_psp", levels=[2], weights=str(tmp_path / "asgnet.pth"))
    assert "lacks 1 tensors" in caplog.text and "layer1.0.bn1.weight" in caplog.text
    assert torch.equal(b.body.bn1.weight, state["bn3.weight"])
    assert torch.equal(b.body.layer2[3].conv2.weight, state["layer2.3.conv2.weight"])

    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        ConfigError, match=r"layer2\.0\.conv1\.weight.*\(3, 3, 1, 1\).*expects \(128, 256, 1, 1\)"
    ):
        Backbone("resnet50_psp", levels=[2], weights=str(tmp_path / "bad.pth"))


def test_missing_weight_file_says_where_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone\.weights=.*nope\.pth: file not found.*resnet50_v2\.pth"):
        Backbone("resnet50_psp", levels=[3], weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="output stride 8 only"):
        Backbone("resnet50_psp", levels=[3], output_stride=16)
    with pytest.raises(ConfigError, match=r"no feature level\(s\) \[7\]"):
        Backbone("vgg16_panet", levels=[7])


# ------------------------------------------------------------------------------------------------
# Freezing and BatchNorm modes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_frozen_backbone_and_bn_mode(bn_mode):
    b = Backbone("resnet18", levels=[2, 3], frozen=True, bn_mode=bn_mode).train()
    assert not any(p.requires_grad for p in b.parameters())
    bn = b.body.bn1
    before = bn.running_mean.clone()
    out = b(torch.randn(2, 3, 33, 33, requires_grad=True))
    assert not out[3].requires_grad
    assert b.uses_batch_stats == (bn_mode == "train")
    assert bn.training == (bn_mode == "train")
    assert torch.equal(before, bn.running_mean) == (bn_mode == "eval")  # train mode drifts (official)
    b.eval()
    assert not b.uses_batch_stats and not bn.training


def test_levels_come_back_by_level_in_any_order():
    b = Backbone("resnet18", levels=[3, 2])
    out = b(torch.randn(1, 3, 33, 33))
    assert b.channels == {2: 128, 3: 256}
    assert out[2].shape[1] == 128 and out[3].shape[1] == 256


# ------------------------------------------------------------------------------------------------
# PANet's VGG-16
# ------------------------------------------------------------------------------------------------

VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def test_vgg16_panet_layout_parameters_and_stride():
    with torch.device("meta"):
        b = Backbone("vgg16_panet", levels=[3, 4])
        out = b(torch.empty(1, 3, 417, 417))
    assert sum(p.numel() for p in b.parameters()) == 14_714_688
    assert all(p.requires_grad for p in b.parameters())
    assert out[4].shape == (1, 512, 53, 53) and out[3].shape == (1, 512, 53, 53)
    feats = b.body.features
    assert [i for i, m in enumerate(feats) if isinstance(m, torch.nn.Conv2d)] == list(VGG_CONVS)
    pools = [
        (i, m.kernel_size, m.stride, m.padding)
        for i, m in enumerate(feats)
        if isinstance(m, torch.nn.MaxPool2d)
    ]
    assert pools == [(4, 3, 2, 1), (9, 3, 2, 1), (16, 3, 2, 1), (23, 3, 1, 1)]
    assert [feats[i].dilation for i in (21, 24, 26, 28)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert len(feats) == 29  # no ReLU after conv5_3, no pool5
    assert b.reduction == {3: 8, 4: 8}


def test_vgg16_panet_last_conv_has_no_relu():
    torch.manual_seed(0)
    b = Backbone("vgg16_panet", levels=[3, 4])
    with torch.no_grad():
        out = b(torch.randn(1, 3, 41, 41))
    assert out[4].shape[-2:] == (6, 6)
    assert out[3].min() >= 0 and out[4].min() < 0


def test_vgg16_loads_torchvision_and_panet_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Backbone("vgg16_panet", levels=[4]).body.state_dict().items()}
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}  # features.N.weight/bias
    assert set(state) == {f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    tv = {**state, "classifier.0.weight": torch.zeros(2, 2), "classifier.6.bias": torch.zeros(2)}
    torch.save(tv, tmp_path / "vgg16-397923af.pth")
    b = Backbone("vgg16_panet", levels=[4], weights=str(tmp_path / "vgg16-397923af.pth"))
    for k, v in b.body.state_dict().items():
        assert torch.equal(v, state[k]), k
    # PANet's nested layout: features.{2*block}.{2*conv}
    blocks = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]
    nested = {}
    for bi, convs in enumerate(blocks):
        for ci, idx in enumerate(convs):
            for p in ("weight", "bias"):
                nested[f"module.encoder.features.{2 * bi}.{2 * ci}.{p}"] = state[f"features.{idx}.{p}"]
    torch.save(nested, tmp_path / "panet.pth")
    b2 = Backbone("vgg16_panet", levels=[4], weights=str(tmp_path / "panet.pth"))
    assert torch.equal(b2.body.features[28].weight, state["features.28.weight"])
    assert torch.equal(b2.body.features[5].bias, state["features.5.bias"])


def test_panet_forward_with_vgg_backbone():
    torch.manual_seed(0)
    model = PANet(functools.partial(Backbone, name="vgg16_panet"), level=4).train()
    size = 41
    masks = torch.zeros(2, 1, size, size, dtype=torch.long)
    masks[..., 8:30, 10:32] = 1
    q_mask = torch.zeros(2, size, size, dtype=torch.long)
    q_mask[:, 5:25, 5:30] = 1
    batch = {"query_img": torch.randn(2, 3, size, size), "support_imgs": torch.randn(2, 1, 3, size, size),
             "support_masks": masks, "query_mask": q_mask}  # fmt: skip
    logits, aux = model(batch)
    assert logits.shape == (2, 2, size, size) and set(aux) == {"align"}
    loss = segmentation_loss(logits, q_mask) + aux["align"]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.body.features[0].weight.grad is not None  # the encoder is fine-tuned
