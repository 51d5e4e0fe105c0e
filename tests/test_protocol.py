"""Evaluation protocols: the PFENet test resize and original-resolution scoring against an independent
reference, the training augmentation's crop rule, and protocol=pfenet|hsnet through the configs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from fewshotseg.data.datamodule import FewShotDataModule, resolve_protocol
from fewshotseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentTransform,
    PadTransform,
    PairTransform,
    pad_transform,
    pfenet_resized_shape,
    train_transform,
)
from fewshotseg.errors import ConfigError
from fewshotseg.lit import FewShotSegModule
from fewshotseg.metrics import FewShotIoU
from helpers import compose_config
from helpers.sources import FSS_SPLITS, make_coco, make_fss, make_voc


def test_pfenet_resized_shape():
    # longer side to 473, then both sides floored to a multiple of 8 (PFENet Resize.find_new_hw)
    assert pfenet_resized_shape(500, 375, 473) == (472, 352)
    assert pfenet_resized_shape(375, 500, 473) == (352, 472)
    assert pfenet_resized_shape(480, 640, 641) == (480, 640)
    assert pfenet_resized_shape(100, 100, 473) == (472, 472)


def test_pad_transform_layout():
    image = np.full((30, 50, 3), 200, np.uint8)
    mask = np.ones((30, 50), np.uint8)
    img, out = pad_transform(41)(image, mask)
    nh, nw = pfenet_resized_shape(30, 50, 41)  # (24, 40)
    assert img.shape == (3, 41, 41) and out.shape == (41, 41)
    assert (out[:nh, :nw] == 1).all() and (out[nh:] == 255).all() and (out[:, nw:] == 255).all()
    black = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # raw 0 padding, normalised
    assert np.allclose(img[:, -1, -1].numpy(), black, atol=1e-5)
    assert np.allclose(
        img[:, 0, 0].numpy(), (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-4
    )
    framed = pad_transform(41).original_frame(mask)
    assert framed.shape == (50, 50) and (framed[:30] == 1).all() and (framed[30:] == 255).all()


def bilinear_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Reference upsampling of [C,H,W] written from the definition: output pixel i samples the input
    at i * (in - 1) / (out - 1), linear weights between the two nearest input pixels."""

    def axis(n_in: int, n_out: int):
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = axis(x.shape[1], out_h)
    x0, x1, wx = axis(x.shape[2], out_w)
    rows = x[:, y0, :] * (1 - wy)[None, :, None] + x[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, batch):
        return self.logits, {}


def test_original_resolution_scoring_equals_hand_upsampled_prediction():
    rng = np.random.default_rng(0)
    size = 33
    labels = []
    for h, w in ((37, 50), (45, 29)):  # landscape and portrait queries
        raw = (rng.random((h, w)) < 0.4).astype(np.uint8)
        raw[rng.random((h, w)) < 0.05] = 255
        labels.append(raw)
    logits = torch.from_numpy(rng.normal(size=(2, 2, size, size))).float()
    transform = PadTransform(size)
    batch = {
        "query_img": torch.zeros(2, 3, size, size),
        "support_imgs": torch.zeros(2, 1, 3, size, size),
        "support_masks": torch.zeros(2, 1, size, size, dtype=torch.long),
        "query_mask": torch.stack([transform(np.zeros((*m.shape, 3), np.uint8), m)[1] for m in labels]),
        "class_id": torch.tensor([3, 4]),
        "query_mask_orig": [torch.from_numpy(transform.original_frame(m)).long() for m in labels],
    }
    module = FewShotSegModule(
        FixedLogits(logits),
        optimizer=None,
        class_names=[f"c{i}" for i in range(5)],
        eval_resolution="original",
    )
    module.eval()
    metric = FewShotIoU(5)
    module._evaluate(batch, metric)

    reference = FewShotIoU(5)
    for i, raw in enumerate(labels):
        side = max(raw.shape)  # PFENet: raw label padded with 255 to a max(H, W) square
        target = np.full((side, side), 255, np.uint8)
        target[: raw.shape[0], : raw.shape[1]] = raw
        up = bilinear_align_corners(logits[i].double().numpy(), side, side)
        pred = (up[1] > up[0]).astype(np.int64)
        reference.update(
            torch.from_numpy(pred)[None], torch.from_numpy(target).long()[None], torch.tensor([3 + i - 1])
        )
    for state in ("intersection", "union", "fb_intersection", "fb_union"):
        assert torch.equal(getattr(metric, state), getattr(reference, state)), state


def test_eval_resolution_null_follows_the_data_protocol():
    module = FewShotSegModule(
        FixedLogits(torch.zeros(1)), optimizer=None, class_names=["a"], eval_resolution=None
    )
    assert module.resolved_eval_resolution() == "input"  # no datamodule attached
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(eval_resolution="original"))
    assert module.resolved_eval_resolution() == "original"
    module.eval_resolution = "input"  # an explicit choice wins
    assert module.resolved_eval_resolution() == "input"


def test_train_crop_keeps_85_percent_of_the_object():
    image = np.zeros((120, 120, 3), np.uint8)
    mask = np.zeros((120, 120), np.uint8)
    mask[40:80, 10:50] = 1  # 1600 px, near the left edge of a larger image
    transform = train_transform(64, scale=(1.0, 1.0), rotate=0, blur_p=0, flip_p=0)
    assert isinstance(transform, AugmentTransform)
    for seed in range(20):
        transform.set_seed(seed)
        img, out = transform(image, mask)
        assert img.shape == (3, 64, 64) and out.shape == (64, 64)
        assert (out == 1).sum() >= 0.85 * 1600
    transform.set_seed(3)
    first = transform(image, mask)[1]
    transform.set_seed(3)
    assert torch.equal(first, transform(image, mask)[1])  # seeded: reproducible


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.protocol='panet'.*\['hsnet', 'pfenet'\]"):
        resolve_protocol("panet", {"pfenet": {}, "hsnet": {}})
    with pytest.raises(ConfigError, match=r"unknown keys \['crop'\]"):
        resolve_protocol("pfenet", {"pfenet": {"crop": 3}})


# --- the configs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol")
    make_voc(base / "VOC2012")
    make_coco(base / "COCO2014", n_images=12)
    make_fss(base / "FSS-1000", FSS_SPLITS)
    return {"pascal": base / "VOC2012", "coco": base / "COCO2014", "fss1000": base / "FSS-1000"}


def compose_data(data: str, root, *overrides: str):
    return compose_config(
        "train", [f"data={data}", f"data.root={root}", "paths.data_dir=/unused", *overrides]
    )


EXPECTED = {  # (data, protocol): test transform, size, episodes, order, min_area, eval resolution, train transform
    ("pascal", None): (PadTransform, 473, 1000, "image", 2048, "original", AugmentTransform),
    ("pascal", "pfenet"): (PadTransform, 473, 1000, "image", 2048, "original", AugmentTransform),
    ("pascal", "hsnet"): (PairTransform, 400, 1000, "pair", 0, "input", PairTransform),
    ("coco", "pfenet"): (PadTransform, 641, 20000, "image", 2048, "original", AugmentTransform),
    ("coco", "hsnet"): (PairTransform, 400, 1000, "class", 0, "input", PairTransform),
    ("fss1000", None): (PairTransform, 400, 2400, "pair", 0, "input", PairTransform),
    ("fss1000", "pfenet"): (PadTransform, 473, 2400, "pair", 0, "original", AugmentTransform),
    ("pascal", "panet"): (PairTransform, 417, 1000, "class", 0, "input", PairTransform),
}


@pytest.mark.parametrize("data,protocol", list(EXPECTED))
def test_protocol_settings_per_dataset(roots, data, protocol):
    cfg = compose_data(data, roots[data], *([f"protocol={protocol}"] if protocol else []))
    dm: FewShotDataModule = instantiate(cfg.data)
    test_cls, size, episodes, order, min_area, resolution, train_cls = EXPECTED[(data, protocol)]
    assert type(dm.test_transform) is test_cls and type(dm.train_transform) is train_cls
    img, mask = dm.test_transform(np.zeros((50, 70, 3), np.uint8), np.zeros((50, 70), np.uint8))
    assert img.shape == (3, size, size)
    if train_cls is AugmentTransform:
        assert dm.train_transform.crop_size == size
    assert (dm.num_test_episodes, dm.test_order, dm.min_area, dm.eval_resolution) == (
        episodes,
        order,
        min_area,
        resolution,
    )
    assert cfg.eval_resolution is None  # the module follows dm.eval_resolution
    if data == "coco":
        assert dm.novel == [4 * k + 1 for k in range(20)]  # interleaved by default


def test_explicit_settings_win_over_the_protocol(roots):
    cfg = compose_data("pascal", roots["pascal"], "protocol=hsnet", "data.num_test_episodes=7", "data.min_area=5",
                       "data.test_order=image", "eval_resolution=original")  # fmt: skip
    dm = instantiate(cfg.data)
    assert (dm.num_test_episodes, dm.min_area, dm.test_order) == (7, 5, "image")
    assert cfg.eval_resolution == "original"


def test_coco_scale_range_and_consecutive_split(roots):
    cfg = compose_data("coco", roots["coco"], "data.fold_split=consecutive", "fold=1")
    dm = instantiate(cfg.data)
    assert dm.novel == list(range(21, 41))
    assert list(cfg.data.protocols.pfenet.scale) == [0.8, 1.25]


def test_fss_fold_must_be_zero(roots):
    cfg = compose_data("fss1000", roots["fss1000"], "fold=2")
    with pytest.raises(Exception, match=r"fold=2: FSS-1000 has one fixed class split"):
        instantiate(cfg.data)


def test_synthetic_default_keeps_its_own_settings(tmp_path):
    cfg = compose_config("train", [f"paths.data_dir={tmp_path}"])
    hsnet = compose_config("train", [f"paths.data_dir={tmp_path}", "protocol=hsnet"])
    assert cfg.data.protocol is None and cfg.eval_resolution is None
    assert cfg.data.test_transform.size == 113 and cfg.data.train_transform.crop_size == 113
    assert hsnet.data.protocol == "hsnet" and hsnet.data.test_transform.size == 113


def test_evaluate_config_accepts_a_protocol():
    cfg = compose_config("evaluate", ["ckpt=x.ckpt", "protocol=hsnet"])
    plain = compose_config("evaluate", ["ckpt=x.ckpt"])
    assert cfg.data.protocol == "hsnet" and plain.data.protocol is None


def test_panet_protocol_tests_on_the_training_split_class_first(roots):
    dm = instantiate(compose_data("pascal", roots["pascal"], "protocol=panet").data)
    assert (dm.test_split, dm.train_order, dm.fold_split) == ("train", "class", "consecutive")
    dm.prepare_data()
    episodes = dm._test_episodes()
    train_ids = set(dm._index("train"))
    assert episodes and all(e.query in train_ids and e.class_id in dm.novel for e in episodes)


def test_selection_chooses_the_validation_episodes(roots):
    def val_and_test(*overrides):
        dm = instantiate(compose_data("pascal", roots["pascal"], "data.num_val_episodes=6",
                                      "data.num_test_episodes=6", *overrides).data)  # fmt: skip
        return dm._val_episodes(), dm._test_episodes()

    held_out, test = val_and_test()
    assert held_out != test  # seed test_seed + 1
    assert val_and_test("data.val_seed=1")[0] == held_out  # test_seed 0 + 1: the same list
    assert val_and_test("data.val_seed=5")[0] != held_out
    authors, test = val_and_test("selection=test_episodes")
    assert authors == test  # the authors' selection: validated on the test episodes
    with pytest.raises(Exception, match="selection='best'"):
        val_and_test("selection=best")
