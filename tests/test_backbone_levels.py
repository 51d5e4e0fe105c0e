"""The backbone level API (issue 7): levels instead of layer names, any timm CNN or ViT, run_stage,
fuse_levels, channels_last; and PANet/ASGNet giving exactly the outputs they gave before the
refactor (tests/data/reference_outputs.pt, computed with the layer-name code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshotseg.backbones import Backbone, fuse_levels
from fewshotseg.errors import ConfigError
from helpers.reference_outputs import REFERENCE_FILE, cases, run


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE_FILE, weights_only=True)


@pytest.mark.parametrize("case", ["panet_resnet18", "panet_vgg16", "asgnet_psp_eval", "asgnet_psp_train_bn"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_paper_methods_unchanged_by_the_level_api(reference, case, channels_last):
    got = run(*cases()[case], channels_last=channels_last)
    assert set(got) == set(reference[case])
    for key, want in reference[case].items():
        # float64: bit-for-bit up to summation order (channels_last changes the conv kernels)
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-10, msg=f"{case} {key}")


@pytest.mark.parametrize(
    "name, channels, strides",
    [
        ("resnet18", {2: 128, 3: 256, 4: 512}, {2: 8, 3: 8, 4: 8}),  # dilated to OS 8
        ("convnext_atto", {2: 80, 3: 160, 4: 320}, {2: 8, 3: 8, 4: 8}),  # timm dilates ConvNeXt too
        ("vgg11", {2: 512, 3: 512, 4: 512}, {2: 8, 3: 16, 4: 32}),  # timm VGG: native strides only
        ("vit_small_patch14_dinov2", {2: 384, 3: 384, 4: 384}, {2: 14, 3: 14, 4: 14}),
        ("vgg16_panet", {2: 256, 3: 512, 4: 512}, {2: 4, 3: 8, 4: 8}),
        ("resnet50_dilated", {2: 512, 3: 1024, 4: 2048}, {2: 8, 3: 8, 4: 8}),
    ],
)
def test_levels_channels_strides_and_maps(name, channels, strides):
    b = Backbone(name, levels=[4, 2, 3]).eval()  # any order, returned by level
    assert b.levels == (2, 3, 4) and b.channels == channels and b.reduction == strides
    with torch.no_grad():
        out = b(torch.randn(1, 3, 65, 65))
    for level in (2, 3, 4):
        h = out[level].shape[-1]
        assert out[level].shape[:2] == (1, channels[level])
        assert h == pytest.approx(65 / strides[level], abs=1.5), (level, h)  # pad/floor/ceil per family


def test_vit_any_input_size_and_evenly_spaced_blocks():
    b = Backbone("vit_small_patch14_dinov2", levels=[1, 2, 3, 4]).eval()
    assert [b.level_block[level] for level in (1, 2, 3, 4)] == [2, 5, 8, 11]
    with torch.no_grad():
        for size in (57, 70, 113):  # not multiples of 14, far from the 518 it was made for
            out = b(torch.randn(1, 3, size, size))
            side = -(-size // 14)  # padded to a multiple of the patch
            assert all(out[level].shape == (1, 384, side, side) for level in (1, 2, 3, 4))
    short = Backbone("vit_small_patch14_dinov2", levels=[2])
    assert len(short.body.blocks) == 6  # blocks past the deepest level are dropped


@pytest.mark.parametrize("name", ["resnet18", "resnet50_psp", "vgg16_panet", "convnext_atto"])
def test_run_stage_continues_from_the_previous_level(name):
    b = Backbone(name, levels=[3, 4]).eval()
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        out = b(x)
        mask = (torch.rand(2, 1, *out[3].shape[-2:]) > 0.5).float()
        assert torch.allclose(b.run_stage(out[3], 4), out[4], atol=1e-5)
        masked = b.run_stage(out[3] * mask, 4)  # PFENet: layer4 of the masked layer3
    assert masked.shape == out[4].shape and not torch.allclose(masked, out[4])
    with pytest.raises(ConfigError, match="run_stage needs level 2"):
        b.run_stage(out[3], 2)


def test_fuse_levels_resizes_coarser_maps_to_the_finest():
    fine, coarse = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)
    fused = fuse_levels({2: fine, 3: coarse}, [3, 2])  # order kept: cat(level 3, level 2)
    assert fused.shape == (1, 5, 8, 8)
    torch.testing.assert_close(
        fused[:, :3], F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    )
    torch.testing.assert_close(fused[:, 3:], fine)
    same = fuse_levels({2: fine, 3: fine * 2}, [3, 2])
    assert torch.equal(same, torch.cat([fine * 2, fine], 1))  # no resampling when sizes agree


def test_unknown_levels_are_a_clear_error():
    with pytest.raises(ConfigError, match=r"has no feature level\(s\) \[5\]"):
        Backbone("resnet18", levels=[5])
    with pytest.raises(ConfigError, match=r"has no feature level\(s\) \[0\]"):
        Backbone("convnext_atto", levels=[0])  # ConvNeXt has no separate stem feature


def test_channels_last_is_the_same_numbers():
    torch.manual_seed(0)
    a = Backbone("resnet50_psp", levels=[2, 3, 4], channels_last=False, bn_mode="eval").eval()
    b = Backbone("resnet50_psp", levels=[2, 3, 4], channels_last=True, bn_mode="eval").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert fb[4].is_contiguous(memory_format=torch.channels_last)  # no-gradient pass: channels_last
    for level in (2, 3, 4):
        torch.testing.assert_close(fb[level], fa[level], rtol=1e-5, atol=1e-5)
    assert b(x)[4].is_contiguous()  # heads that backpropagate get NCHW maps
    trained = Backbone("resnet18", levels=[3], channels_last=True).train()
    assert trained.body.conv1.weight.is_contiguous()  # a backpropagated backbone keeps NCHW weights
    out = trained(x)[3]
    assert out.is_contiguous() and out.requires_grad


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch14_dinov2", "vgg16_panet"])
def test_forward_a_subset_of_levels_stops_early(name):
    b = Backbone(name, levels=[2, 3, 4], bn_mode="train").train()
    x = torch.randn(2, 3, 49, 49)
    with torch.no_grad():
        full = b(x)
        part = b(x, levels=[2, 3])
    assert set(part) == {2, 3}
    if name != "resnet18":  # BN in train mode updates statistics between the two passes
        torch.testing.assert_close(part[3], full[3])
    with pytest.raises(ConfigError, match="not all built"):
        b(x, levels=[1])


def test_a_level_4_subset_pass_leaves_level_4_statistics_alone():
    b = Backbone("resnet18", levels=[3, 4], bn_mode="train").train()
    before = b.body.layer4[0].bn1.running_mean.clone()
    b(torch.randn(2, 3, 49, 49), levels=[3])
    assert torch.equal(before, b.body.layer4[0].bn1.running_mean)
