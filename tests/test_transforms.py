"""Training augmentation: crop shapes, and the crop settings a config accepts."""

import numpy as np
import pytest
import torch

from wsss.config import load_config
from wsss.data.transforms import TrainTransform
from wsss.errors import ConfigError


def test_a_rectangular_crop_keeps_a_landscape_image_whole_and_pads_only_what_is_missing():
    rgb = np.full((30, 50, 3), 200, np.uint8)
    mask = np.ones((30, 50), np.uint8)
    t = TrainTransform((32, 50), (1.0, 1.0), hflip=False)
    img, m = t(rgb, mask, seed=0)
    assert img.shape == (3, 32, 50) and m.shape == (32, 50)
    # 30 of 32 rows are image: the padding (ignore) is two rows, every column is kept
    assert int((m == 255).sum()) == 2 * 50 and int((m == 1).sum()) == 30 * 50
    square = TrainTransform(50, (1.0, 1.0), hflip=False)
    img_sq, m_sq = square(rgb, mask, seed=0)
    assert img_sq.shape == (3, 50, 50) and int((m_sq == 255).sum()) == 20 * 50
    # same seed, same crop
    assert torch.equal(t(rgb, mask, seed=3)[0], t(rgb, mask, seed=3)[0])


def test_crop_size_is_a_side_or_a_height_and_width():
    assert load_config(None, ["train.crop_size=[224,320]"]).train.crop_size == (224, 320)
    assert load_config(None, ["seg.train.crop_size=256"]).seg.train.crop_size == 256
    with pytest.raises(ConfigError, match=r"train\.crop_size"):
        load_config(None, ["train.crop_size=[8,320]"])
    with pytest.raises(ConfigError, match=r"train\.crop_size"):
        load_config(None, ["train.crop_size=[224,320,3]"])
