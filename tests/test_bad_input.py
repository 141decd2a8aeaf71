"""Bad input: a clear error naming the file and the problem, and nothing already computed is lost."""

import logging

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.config.schema import DataConfig
from wsss.data.io import load_image, load_mask
from wsss.data.readers import open_dataset
from wsss.errors import ConfigError, DataError
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage


def _first_id(root, split="train"):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]


def test_truncated_image_named_before_training(fast_cfg, toy_root):
    i = _first_id(toy_root)
    p = toy_root / "JPEGImages" / f"{i}.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    ctx = RunContext(fast_cfg())
    with pytest.raises(DataError) as e:
        run_stage(ctx, "cls")
    assert f"{i}.jpg" in str(e.value) and "truncated" in str(e.value)


def test_corrupt_test_image_named_before_any_map_and_extraction_keeps_the_other_maps(fast_cfg, toy_root):
    ctx = RunContext(fast_cfg(**{"train.epochs": 1, "maps.splits": "[train, test]"}))
    run_stage(ctx, "cls")
    bad = _first_id(toy_root, "test")
    (toy_root / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError) as e:  # the maps stage's check decodes every image before any map is made
        run_stage(ctx, "maps")
    assert f"{bad}.jpg" in str(e.value)
    assert not list((ctx.run_dir / "maps").rglob("*.npz"))

    # a file that breaks during the extraction itself: the other maps are kept, the bad one is named
    model = maps_stage.inference_model(ctx, ctx.run_dir / "cls" / "model.pt")
    out = ctx.run_dir / "scratch"
    samples = ctx.reader.samples("test")
    with pytest.raises(DataError) as e:
        maps_stage.extract(ctx, model, samples, out, "gt")
    assert f"{bad}.jpg" in str(e.value)
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted({s.id for s in samples} - {bad})
    # fixing the file and rerunning computes only the missing map
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(toy_root / "JPEGImages" / f"{bad}.jpg")
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert maps_stage.extract(ctx, model, samples, out, "gt")["computed"] == 1
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_mask_of_wrong_size(toy_root):
    i = _first_id(toy_root)
    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(toy_root / "SegmentationClass" / f"{i}.png")
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(root=str(toy_root))).samples("train")
    assert f"{i}.png" in str(e.value) and "10x10" in str(e.value) and "64x48" in str(e.value)


def test_mask_value_neither_class_nor_ignore(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [7, 255]], np.uint8), "L").save(p)
    with pytest.raises(DataError) as e:
        load_mask(p, num_classes=4)
    assert "m.png" in str(e.value) and "[7]" in str(e.value)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="mode RGB"):
        load_mask(rgb, num_classes=4)


def test_empty_label_set_skipped_with_warning(fast_cfg, toy_root, caplog):
    i = _first_id(toy_root)
    m = Image.fromarray(np.full((48, 64), 255, np.uint8), "L")
    m.save(toy_root / "SegmentationClass" / f"{i}.png")
    ctx = RunContext(fast_cfg(**{"train.epochs": 1}))
    with caplog.at_level(logging.WARNING):
        stage = run_stage(ctx, "cls")
    assert stage.info()["skipped_empty_labels"] == 1
    assert any("empty label set" in r.message and i in r.message for r in caplog.records)


def test_unknown_class_in_config(toy_root):
    with pytest.raises(ConfigError) as e:
        open_dataset(DataConfig(root=str(toy_root), to_background=["gras"]))
    assert "'gras'" in str(e.value) and "red" in str(e.value)


def test_missing_split_file(toy_root):
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(root=str(toy_root))).samples("trainval")
    assert "trainval.txt" in str(e.value) and "train, val" in str(e.value).replace("test, ", "")


def test_missing_dataset_root_says_how_to_get_one(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        open_dataset(DataConfig(root=str(tmp_path / "nowhere")))


def test_config_key_typo():
    with pytest.raises(ConfigError, match="Did you mean 'localizer'"):
        load_config(None, ["maps.localiser=grad_cam"])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16"])
def test_image_modes_converted_to_rgb(tmp_path, mode):
    arr = (np.arange(12 * 10) % 250).reshape(10, 12).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 200)
        path = tmp_path / "x.png"
    else:
        img = Image.fromarray(np.stack([arr] * 3, -1)).convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert out.max() > 0


def test_missing_image_named(tmp_path):
    with pytest.raises(DataError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
