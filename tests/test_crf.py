"""Dense CRF refinement (wsss.refine.crf) and its use in the pseudo-mask stage."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.config.schema import CrfConfig
from wsss.data.io import load_image
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError
from wsss.layout import MAPS, PSEUDO
from wsss.localize import load_maps, save_maps
from wsss.pseudo import pseudo_mask
from wsss.refine import check_crf_config, crf_pseudo_mask, dense_crf, maps_to_probs, refine_many
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline, run_stage

from conftest import fast_overrides, make_voc_dataset

H, W, EDGE = 40, 60, 30
BG_SPEC = DatasetSpec("bg", ("background", "obj", "other"), background=0)
NO_BG_SPEC = DatasetSpec("nobg", ("ground", "obj", "other"), background=None)


def edge_image(seed=0) -> np.ndarray:
    """Left half dark, right half bright (columns >= EDGE), with a little noise; HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(W) < EDGE, 40, 210)[None, :, None]
    return (base + rng.integers(-8, 9, (H, W, 3))).clip(0, 255).astype(np.uint8)


def rough_probs(offset=6) -> np.ndarray:
    """Two-class probabilities whose boundary (p = 0.5) lies ``offset`` px right of the true edge."""
    x = np.arange(W)
    p1 = np.broadcast_to(1 / (1 + np.exp(-(x - (EDGE + offset - 0.5)) / 3)), (H, W))
    return np.stack([1 - p1, p1]).astype(np.float32)


def test_crf_snaps_an_offset_boundary_to_the_image_edge():
    truth = np.broadcast_to(np.arange(W) >= EDGE, (H, W)).astype(int)
    probs = rough_probs()
    rough_agree = (probs.argmax(0) == truth).mean()
    q = dense_crf(edge_image(), probs, CrfConfig())
    assert q.shape == (2, H, W) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    labels = q.argmax(0)
    first_right = np.array([np.argmax(row == 1) for row in labels])  # per row, first column labelled "right"
    assert np.all(np.abs(first_right - EDGE) <= 1), first_right
    assert (labels == truth).mean() > 0.97
    assert rough_agree < 0.97  # the 6 px offset: 90 %


def test_dense_crf_rejects_non_uint8_images_and_shape_mismatches():
    img = edge_image()
    probs = rough_probs()
    normalised = (img.astype(np.float32) - 128.0) / 64.0  # what a network sees: must never reach the CRF
    with pytest.raises(TypeError, match="uint8"):
        dense_crf(normalised, probs, CrfConfig())
    with pytest.raises(TypeError, match="uint8"):
        dense_crf(img.astype(np.float64), probs, CrfConfig())
    with pytest.raises(TypeError, match="HxWx3"):
        dense_crf(np.ascontiguousarray(img.transpose(2, 0, 1)), probs, CrfConfig())  # CHW layout
    with pytest.raises(ValueError, match="do not match"):
        dense_crf(img, probs[:, :, : W - 1], CrfConfig())
    with pytest.raises(ValueError, match="do not match"):
        dense_crf(img, probs[0], CrfConfig())


def test_dense_crf_with_one_label_returns_ones_without_running_the_crf(monkeypatch):
    import pydensecrf.densecrf as dcrf

    def boom(*a, **k):
        raise AssertionError("the CRF must not run for a single label")

    monkeypatch.setattr(dcrf, "DenseCRF2D", boom)
    q = dense_crf(edge_image(), np.full((1, H, W), 0.3, np.float32), CrfConfig())
    assert q.shape == (1, H, W) and np.all(q == 1.0)


@pytest.mark.parametrize("key, value", [
    ("temperature", 0.0), ("temperature", -1.0), ("iterations", 0), ("iterations", 101), ("gaussian_sxy", 0.0),
    ("bilateral_sxy", -3.0), ("bilateral_srgb", 0.0), ("gaussian_compat", -1.0), ("bilateral_compat", float("nan")),
    ("workers", -1),
])
def test_check_crf_config_names_the_bad_key(key, value):
    with pytest.raises(ConfigError, match=rf"crf\.{key}"):
        check_crf_config(dataclasses.replace(CrfConfig(), **{key: value}))


@pytest.mark.parametrize("low, high, key", [
    (0.5, 0.5, "confident_bg_low"), (0.6, 0.3, "confident_bg_low"), (0.0, 0.5, "confident_bg_low"),
    (0.2, 1.0, "confident_bg_high"), (0.2, None, "confident_bg_high"), (None, 0.4, "confident_bg_low"),
])
def test_check_crf_config_rejects_bad_confident_thresholds(low, high, key):
    with pytest.raises(ConfigError, match=rf"crf\.{key}"):
        check_crf_config(CrfConfig(confident_bg_low=low, confident_bg_high=high))


def test_check_crf_config_accepts_the_defaults_and_a_confident_pair():
    check_crf_config(CrfConfig())
    check_crf_config(CrfConfig(confident_bg_low=0.05, confident_bg_high=0.3, workers=0, gaussian_compat=0.0))


def test_maps_to_probs_channels_and_arg_max_match_the_threshold_rule():
    rng = np.random.default_rng(1)
    maps = rng.random((2, H, W)).astype(np.float32)
    classes = np.array([2, 1])
    probs, labels = maps_to_probs(maps, classes, BG_SPEC, 0.4, temperature=0.1)
    assert probs.shape == (3, H, W) and labels.tolist() == [0, 2, 1]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # without a CRF, the arg-max of the probabilities is exactly pseudo_mask's rule
    np.testing.assert_array_equal(labels[probs.argmax(0)], pseudo_mask(maps, classes, BG_SPEC, 0.4))
    probs, labels = maps_to_probs(maps, classes, NO_BG_SPEC, None, temperature=0.5)
    assert probs.shape == (2, H, W) and labels.tolist() == [2, 1]
    np.testing.assert_array_equal(labels[probs.argmax(0)], pseudo_mask(maps, classes, NO_BG_SPEC))
    with pytest.raises(ValueError, match="background threshold"):
        maps_to_probs(maps, classes, BG_SPEC, None, temperature=0.1)


def banded_scene(seed=0):
    """Three vertical bands of distinct colour whose 'obj' scores are low (0.1), middling (0.45) and high (0.9)."""
    rng = np.random.default_rng(seed)
    band = np.arange(48) // 16
    img = (np.array([30, 120, 220])[band][None, :, None] + rng.integers(-5, 6, (30, 48, 3))).astype(np.uint8)
    maps = (np.array([0.1, 0.45, 0.9])[band][None, None, :] + rng.normal(0, 0.05, (1, 30, 48)))
    return img, maps.clip(0, 1).astype(np.float32), np.array([1]), band


def test_confident_regions_ignore_pixels_where_low_and_high_threshold_crfs_disagree():
    img, maps, classes, band = banded_scene()
    cfg = CrfConfig()
    at_low = crf_pseudo_mask(img, maps, classes, BG_SPEC, 0.25, cfg)  # weak background: object grows
    at_high = crf_pseudo_mask(img, maps, classes, BG_SPEC, 0.7, cfg)  # strong background: object shrinks
    disagree = at_low != at_high
    assert disagree.any() and (~disagree).any()
    conf = crf_pseudo_mask(img, maps, classes, BG_SPEC, 0.5, dataclasses.replace(cfg, confident_bg_low=0.25,
                                                                                   confident_bg_high=0.7))
    assert np.all(conf[disagree] == 255)
    np.testing.assert_array_equal(conf[~disagree], at_low[~disagree])
    # the scene gives all three outcomes: confident background, ignored rim, confident object
    cols = np.broadcast_to(band, conf.shape)
    assert np.all(conf[cols == 0] == 0) and np.all(conf[cols == 1] == 255) and np.all(conf[cols == 2] == 1)


def test_crf_pseudo_mask_edge_cases():
    img, maps, classes, _ = banded_scene()
    # no classes: all background with a background class, all ignore without
    empty = np.zeros((0, *maps.shape[1:]), np.float32)
    assert np.all(crf_pseudo_mask(img, empty, np.array([], int), BG_SPEC, 0.3, CrfConfig()) == 0)
    assert np.all(crf_pseudo_mask(img, empty, np.array([], int), NO_BG_SPEC, None, CrfConfig()) == 255)
    # ignore_below keeps pseudo_mask's raw-map ignore band
    mask = crf_pseudo_mask(img, maps, classes, BG_SPEC, 0.7, CrfConfig(), ignore_below=0.3)
    band = pseudo_mask(maps, classes, BG_SPEC, 0.7, ignore_below=0.3) == 255
    assert band.any() and np.all(mask[band] == 255)
    with pytest.raises(ValueError, match="do not match"):
        crf_pseudo_mask(img[:, :-1], maps, classes, BG_SPEC, 0.5, CrfConfig())


def test_refine_many_in_process_keeps_order():
    assert list(refine_many(abs, [3, -1, -7, 2], workers=0)) == [3, 1, 7, 2]


def pseudo_on_seeded_maps(ctx: RunContext):
    """The pseudo stage on the maps stage a test seeded: complete under its key, it needs no classifier."""
    return run_stage(ctx, PSEUDO)


def _masks(stage_dir):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((stage_dir / "train").glob("*.png"))}


def seed_rough_maps(ctx: RunContext, dy=3, dx=4) -> dict:
    """Write a complete maps stage for the train split, so the pseudo stage runs without training a classifier:
    per image, maps of its classes that are its ground truth shifted by (dy, dx) px (boundaries off the colour
    edges, as CAMs are). Returns the ground-truth masks."""
    stage = Pipeline(ctx).stage(MAPS)
    stage.open()
    rng = np.random.default_rng(0)
    truth = {}
    for s in ctx.reader.samples("train"):
        gt = ctx.reader.load_mask(s)
        truth[f"{s.id}.png"] = gt
        shifted = np.pad(np.where(gt == 255, 0, gt), ((dy, 0), (dx, 0)), mode="edge")[: gt.shape[0], : gt.shape[1]]
        classes = np.array(sorted(s.labels))
        # soft scores (0.6 on the shifted class region, 0.4 elsewhere), as smooth as CAMs are
        maps = np.stack([np.where(shifted == c, 0.6, 0.4) for c in classes])
        maps = maps + rng.normal(0, 0.03, maps.shape)
        save_maps(stage.dir / "train" / f"{s.id}.npz", maps.clip(0, 1), classes, np.zeros(ctx.spec.num_fg))
    stage.finish(splits={ctx.split_name(r): {"seeded": True} for r in ctx.cfg.maps.splits})  # covers maps.splits
    return truth


def accuracy(masks: dict, truth: dict) -> float:
    hits = sum(((masks[k] == t) & (t != 255)).sum() for k, t in truth.items())
    return hits / sum((t != 255).sum() for t in truth.values())


def test_pseudo_stage_with_crf_writes_masks_and_workers_do_not_change_them(fast_cfg):
    ctx = RunContext(fast_cfg(**{"train.epochs": 1, "pseudo.refiners": "[crf]", "crf.workers": 0}))
    truth = seed_rough_maps(ctx)
    stage = pseudo_on_seeded_maps(ctx)
    assert not (ctx.run_dir / "cls").exists()  # the seeded maps were used
    masks = _masks(stage.dir)
    assert sorted(masks) == sorted(truth)  # one PNG per train image
    info = json.loads((stage.dir / "stage.json").read_text())
    assert info["complete"] and info["images"] == len(truth) and info["images_per_s"] > 0
    assert info["refiners"] == ["crf"]
    assert Image.open(next((stage.dir / "train").glob("*.png"))).mode == "P"
    # the CRF pulls the shifted boundaries back onto the rectangles' edges
    raw = {}
    for k in truth:
        m = load_maps(ctx.run_dir / "maps" / "train" / k.replace(".png", ".npz"))
        raw[k] = pseudo_mask(m["maps"], m["classes"], ctx.spec)
    assert accuracy(raw, truth) < 0.9 and accuracy(masks, truth) > 0.95  # 0.87 -> 0.97

    ctx2 = RunContext(fast_cfg(**{"train.epochs": 1, "pseudo.refiners": "[crf]", "crf.workers": 2}))
    # workers cannot change the masks, so they are not in the key
    assert Pipeline(ctx2).key(PSEUDO) == Pipeline(ctx).key(PSEUDO)
    shutil.rmtree(stage.dir)  # recompute, on the same maps
    stage2 = pseudo_on_seeded_maps(ctx2)
    assert json.loads((stage2.dir / "stage.json").read_text())["workers"] == 2
    masks2 = _masks(stage2.dir)
    assert masks2.keys() == masks.keys()
    for name in masks:
        np.testing.assert_array_equal(masks2[name], masks[name], err_msg=name)


def test_pseudo_stage_passes_confident_regions_on_a_background_dataset(tmp_path):
    root = make_voc_dataset(tmp_path / "bg", background=True)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{
        "pseudo.bg_threshold": 0.5, "pseudo.refiners": "[crf]", "crf.workers": 0, "crf.confident_bg_low": 0.45,
        "crf.confident_bg_high": 0.52}))
    ctx = RunContext(cfg)
    seed_rough_maps(ctx)
    stage = pseudo_on_seeded_maps(ctx)
    masks = _masks(stage.dir)
    assert len(masks) == len(ctx.reader.samples("train"))
    for s in ctx.reader.samples("train"):
        m = load_maps(ctx.run_dir / "maps" / "train" / f"{s.id}.npz")
        expected = crf_pseudo_mask(load_image(s.image), m["maps"], m["classes"], ctx.spec, 0.5, cfg.crf)
        np.testing.assert_array_equal(masks[f"{s.id}.png"], expected)
    values = np.unique(np.concatenate([m.ravel() for m in masks.values()]))
    assert 0 in values and 255 in values and len(set(values) - {0, 255}) > 0


def test_pseudo_stage_checks_the_crf_config_before_training(fast_cfg):
    cfg = fast_cfg(**{"pseudo.refiners": "[crf]"})
    cfg.crf.temperature = 0.0  # past the loader's own check: the stage checks again before the classifier trains
    ctx = RunContext(cfg)
    with pytest.raises(ConfigError, match=r"crf\.temperature"):
        run_stage(ctx, "pseudo")
    assert not (ctx.run_dir / "cls").exists()
