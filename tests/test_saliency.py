"""Saliency sources (wsss.saliency), saliency-guided pseudo masks (the ``saliency`` refiner, wsss.refine.saliency)
and their use in the pseudo stage."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.config.schema import CrfConfig, SaliencyConfig
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError, DataError
from wsss.evaluation import ThresholdSweep
from wsss.layout import MAPS, PSEUDO
from wsss.localize import save_maps
from wsss.pseudo.masks import best_class
from wsss.refine.crf import crf_refine_mask, mask_probs
from wsss.refine.saliency import check_saliency_config, fuse, fuse_best
from wsss.saliency import SALIENCY_SOURCES, build_source, saliency_key
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline, run_stage

from conftest import fast_overrides, make_voc_dataset

SPEC = DatasetSpec("bg", ("background", "cat", "dog", "cow"), background=0)
NO_BG = DatasetSpec("nobg", ("grass", "cat", "dog"), background=None)
BG, CAT, DOG, IGN = 0, 1, 2, 255


# -- fusion ------------------------------------------------------------------------------------------------------
def two_class_maps(h=4, w=6):
    """cat wins in columns < 3, dog in columns >= 3 (scores 0.9 vs 0.2)."""
    left = np.broadcast_to(np.arange(w) < 3, (h, w))
    cat = np.where(left, 0.9, 0.2)
    dog = np.where(left, 0.2, 0.9)
    return np.stack([cat, dog]).astype(np.float32), np.array([CAT, DOG])


def test_zero_saliency_is_background_whatever_the_cam_says():
    maps, classes = two_class_maps()
    maps[:] = 1.0  # every class at its peak everywhere
    sal = np.zeros((4, 6), np.float32)
    sal[:, 4:] = 0.8
    for kwargs in ({}, {"ignore_band": 0.5}, {"min_cam": 0.5}):  # not even the ignore band touches zero saliency
        mask = fuse(sal, maps, classes, SPEC, threshold=0.0, **kwargs)
        assert (mask[:, :4] == BG).all(), kwargs
    assert (fuse(sal, maps, classes, SPEC, threshold=0.0)[:, 4:] == CAT).all()  # ties -> first class


def test_salient_pixels_take_the_cam_arg_max_class_and_the_rest_is_background():
    maps, classes = two_class_maps()
    sal = np.zeros((4, 6), np.float32)
    sal[1:3, :] = 0.7  # rows 1-2 salient, rows 0 and 3 weakly salient
    sal[[0, 3], :] = 0.3
    mask = fuse(sal, maps, classes, SPEC, threshold=0.5)
    expected = np.full((4, 6), BG, np.uint8)
    expected[1:3, :3] = CAT
    expected[1:3, 3:] = DOG
    np.testing.assert_array_equal(mask, expected)
    # one class: every salient pixel is that class, however weak its map is there
    one = fuse(sal, maps[1:] * 0.01, classes[1:], SPEC, threshold=0.5)
    np.testing.assert_array_equal(one, np.where(expected == BG, BG, DOG))
    # no class at all: all background
    assert (fuse(sal, maps[:0], classes[:0], SPEC, threshold=0.5) == BG).all()


def test_ignore_band_and_min_cam_mark_uncertain_pixels():
    maps, classes = two_class_maps(1, 6)
    maps[:, 0, 5] = 0.1  # column 5: no class claims it
    sal = np.array([[0.0, 0.2, 0.45, 0.55, 0.9, 0.9]], np.float32)
    band = fuse(sal, maps, classes, SPEC, threshold=0.5, ignore_band=0.1)
    np.testing.assert_array_equal(band, [[BG, BG, IGN, IGN, DOG, CAT]])  # column 5: a tie, first class
    low_cam = fuse(sal, maps, classes, SPEC, threshold=0.5, min_cam=0.5)
    np.testing.assert_array_equal(low_cam, [[BG, BG, BG, DOG, DOG, IGN]])


def test_fusion_needs_a_background_class_and_valid_settings():
    maps, classes = two_class_maps()
    with pytest.raises(ConfigError, match="background"):
        fuse(np.ones((4, 6)), maps, classes, NO_BG, 0.5)
    with pytest.raises(ConfigError, match="background class.*to_background"):
        check_saliency_config(SaliencyConfig(), NO_BG)
    for key, value in (("threshold", 1.0), ("threshold", -0.1), ("ignore_band", -1.0), ("min_cam", float("nan"))):
        with pytest.raises(ConfigError, match=f"saliency.{key}"):
            check_saliency_config(SaliencyConfig(**{key: value}), SPEC)
    check_saliency_config(SaliencyConfig(threshold=0.3, ignore_band=0.05, min_cam=0.2), SPEC)
    with pytest.raises(ValueError, match="do not match"):
        fuse(np.ones((4, 5)), maps, classes, SPEC, 0.5)


def test_sweep_scores_each_threshold_like_fuse():
    maps, classes = two_class_maps()
    sal = np.tile(np.array([0.1, 0.4, 0.6, 0.6, 0.4, 0.1], np.float32), (4, 1))
    gt = np.array([[BG, BG, CAT, DOG, BG, BG]] * 4, np.uint8)  # exactly the pixels above 0.5
    sweep = ThresholdSweep(SPEC, [0.05, 0.3, 0.5])  # the evaluation's sweep, of the fusion rule
    label, score = best_class(maps, classes)
    sweep.add_masks(gt, lambda t: fuse_best(sal, label, score, SPEC, t))
    for t in (0.05, 0.3, 0.5):
        np.testing.assert_array_equal(fuse_best(sal, label, score, SPEC, t), fuse(sal, maps, classes, SPEC, t))
    res = {r["threshold"]: r["miou"] for r in sweep.results()}
    assert res[0.5] == 100.0 and res[0.3] < 100.0 and res[0.05] < res[0.3]
    assert sweep.best()["threshold"] == 0.5


def test_fused_probs_and_crf_keep_ignore_and_zero_saliency():
    mask = np.array([[BG, CAT, IGN]], np.uint8)
    probs = mask_probs(mask, np.array([BG, CAT, DOG]), 0.7, IGN)
    np.testing.assert_allclose(probs[:, 0, 0], [0.7, 0.15, 0.15])
    np.testing.assert_allclose(probs[:, 0, 1], [0.15, 0.7, 0.15])
    np.testing.assert_allclose(probs[:, 0, 2], [1 / 3] * 3)
    # a right half that is CAT in the image but half-labelled background: the CRF fills it, ignore stays ignore
    h, w = 20, 30
    image = np.full((h, w, 3), 40, np.uint8)
    image[:, 15:] = 220
    fused = np.full((h, w), BG, np.uint8)
    fused[:, 20:] = CAT
    fused[:2, 25:] = IGN
    fused[-1, -1] = BG  # zero saliency: the fusion made it background, and the CRF after it must keep that
    zero = np.zeros((h, w), bool)
    zero[-1, -1] = True
    out = crf_refine_mask(image, fused, np.array([CAT]), SPEC, CrfConfig(), 0.7, fixed=zero)
    assert (out[2:, 15:-1] == CAT).mean() > 0.95 and (out[:, :15] == BG).all()
    assert (out[:2, 25:] == IGN).all() and out[-1, -1] == BG
    assert crf_refine_mask(image, fused, np.array([CAT]), SPEC, CrfConfig(), 0.7)[-1, -1] == CAT  # without fixed


# -- classical sources -------------------------------------------------------------------------------------------
def patch_image(kind: str):
    """96x128 (non-square, so rows/columns mix-ups show) uniform-noise or textured field with a 12x12 odd patch at
    rows 40-51, columns 80-91."""
    rng = np.random.default_rng(3)
    if kind == "uniform":
        img = (128 + rng.integers(-8, 9, (96, 128, 3))).astype(np.uint8)
    else:  # grey pixel noise over a wide range of grey
        img = rng.integers(70, 170, (96, 128, 1)).repeat(3, 2).astype(np.uint8)
    # odd in colour and in grey level (the spectral residual sees grey only: grey 205 is outside the texture's range)
    img[40:52, 80:92] = (240, 220, 40)
    inside = np.zeros((96, 128), bool)
    inside[40:52, 80:92] = True
    return img, inside


@pytest.mark.parametrize("source", ["spectral_residual", "frequency_tuned"])
@pytest.mark.parametrize("kind", ["uniform", "textured"])
def test_classical_saliency_lands_on_the_odd_patch(source, kind):
    img, inside = patch_image(kind)
    sal = build_source(SaliencyConfig(source=source))(img, None)
    assert sal.shape == (96, 128) and sal.dtype == np.float32 and sal.min() >= 0 and sal.max() <= 1
    assert sal[inside].mean() > 4 * sal[~inside].mean()
    y, x = np.unravel_index(sal.argmax(), sal.shape)
    assert 38 <= y <= 53 and 78 <= x <= 93, (y, x)


def test_classical_saliency_of_a_flat_image_is_zero_and_bad_options_are_named():
    flat = np.full((20, 30, 3), 77, np.uint8)
    for name in ("spectral_residual", "frequency_tuned"):
        assert (build_source(SaliencyConfig(source=name))(flat, None) == 0).all()
    with pytest.raises(ConfigError, match="saliency.sr_width"):
        build_source(SaliencyConfig(sr_width=4))
    with pytest.raises(ConfigError, match="Did you mean 'spectral_residual'"):
        build_source(SaliencyConfig(source="spectral_residue"))
    with pytest.raises(TypeError, match="uint8"):
        build_source(SaliencyConfig())(flat.astype(np.float32), None)
    assert {"spectral_residual", "frequency_tuned", "onnx", "u2net", "u2netp", "folder"} <= set(SALIENCY_SOURCES.names())


# -- onnx --------------------------------------------------------------------------------------------------------
def onnx_model(path, in_shape, out_shape, nodes):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def mean_sigmoid_model(path, in_shape=(1, 3, 8, 8), out_shape=(1, 1, 8, 8)):
    """y = sigmoid(mean over channels of x)."""
    from onnx import helper

    return onnx_model(path, in_shape, out_shape, [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
                                                  helper.make_node("Sigmoid", ["m"], ["y"])])


def test_onnx_source_runs_a_good_model(tmp_path):
    pytest.importorskip("onnx")
    path = mean_sigmoid_model(tmp_path / "good.onnx")
    cfg = SaliencyConfig(source="onnx", onnx_path=path, onnx_mean=(0.5, 0.5, 0.5), onnx_std=(0.5, 0.5, 0.5))
    src = build_source(cfg)
    assert src.size == (8, 8)  # the model's own input size
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    x = (img / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(src(img, None), 1 / (1 + np.exp(-x.mean(2))), atol=1e-5)
    # another image size: resized in and out; a uniform image gives a uniform map of the hand-computed value
    big = np.full((30, 20, 3), 255, np.uint8)
    np.testing.assert_allclose(src(big, None), 1 / (1 + np.exp(-1.0)), atol=1e-5)
    assert src(big, None).shape == (30, 20)


def test_onnx_source_dynamic_size_logit_output_and_file_errors(tmp_path):
    pytest.importorskip("onnx")
    from onnx import helper

    dyn = onnx_model(tmp_path / "dyn.onnx", (1, 3, "h", "w"), (1, "h", "w"),
                     [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)])
    with pytest.raises(ConfigError, match="saliency.onnx_size.*dynamic"):
        build_source(SaliencyConfig(source="onnx", onnx_path=dyn))
    cfg = SaliencyConfig(source="onnx", onnx_path=dyn, onnx_size=(6, 10), onnx_mean=(0, 0, 0), onnx_std=(1, 1, 1))
    img = np.full((12, 20, 3), 255, np.uint8)
    with pytest.raises(ConfigError, match="saliency.onnx_output.*logit"):  # raw values of 1.0: fine; 2.0: not
        build_source(SaliencyConfig(**{**cfg.__dict__, "onnx_std": (0.5, 0.5, 0.5)}))(img, None)
    logit = build_source(SaliencyConfig(**{**cfg.__dict__, "onnx_output": "logit"}))
    np.testing.assert_allclose(logit(img, None), 1 / (1 + np.exp(-1.0)), atol=1e-5)
    fixed = mean_sigmoid_model(tmp_path / "fixed.onnx")
    with pytest.raises(ConfigError, match="height 6 \\(model: 8\\)"):
        build_source(SaliencyConfig(source="onnx", onnx_path=fixed, onnx_size=(6, 8)))
    with pytest.raises(ConfigError, match="saliency.onnx_path: .* does not exist"):
        build_source(SaliencyConfig(source="onnx", onnx_path=str(tmp_path / "nope.onnx")))
    with pytest.raises(ConfigError, match="saliency.onnx_path: the onnx saliency source needs"):
        build_source(SaliencyConfig(source="onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a loadable ONNX model"):
        build_source(SaliencyConfig(source="onnx", onnx_path=str(junk)))


def test_onnx_source_rejects_a_wrong_shape_model_naming_both_shapes(tmp_path):
    pytest.importorskip("onnx")
    from onnx import helper

    three = onnx_model(tmp_path / "rgb_out.onnx", (1, 3, 8, 8), (1, 3, 8, 8), [helper.make_node("Identity", ["x"], ["y"])])
    with pytest.raises(ConfigError) as e:
        build_source(SaliencyConfig(source="onnx", onnx_path=three))
    msg = str(e.value)
    assert "expected input (1, 3, H, W) float and output (1, 1, H, W) or (1, H, W) float" in msg
    assert "output(s) 'y' (1, 3, 8, 8)" in msg and "input(s) 'x' (1, 3, 8, 8)" in msg
    grey_in = mean_sigmoid_model(tmp_path / "grey_in.onnx", in_shape=(1, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"input\(s\) 'x' \(1, 1, 8, 8\)"):
        build_source(SaliencyConfig(source="onnx", onnx_path=grey_in))


# -- folder ------------------------------------------------------------------------------------------------------
def test_folder_source_lists_every_missing_id_and_reads_maps(tmp_path):
    folder = tmp_path / "sal"
    folder.mkdir()
    Image.fromarray(np.array([[0, 51, 255]], np.uint8), "L").save(folder / "a.png")
    Image.fromarray(np.zeros((2, 2), np.uint8), "L").save(folder / "c.png")
    samples = [Sample(i, tmp_path / f"{i}.jpg", None, ()) for i in ("a", "b", "c", "d")]
    src = build_source(SaliencyConfig(source="folder", folder=str(folder)))
    with pytest.raises(DataError, match=r"for 2 of 4 images: b, d$"):
        src.check(samples)
    src.check([samples[0], samples[2]])
    np.testing.assert_allclose(src(np.zeros((1, 3, 3), np.uint8), samples[0]), [[0.0, 0.2, 1.0]])
    with pytest.raises(DataError, match="c.png: saliency map is 2x2 .* image is 3x1"):
        src(np.zeros((1, 3, 3), np.uint8), samples[2])
    with pytest.raises(ConfigError, match="saliency.folder: .* is not a directory"):
        build_source(SaliencyConfig(source="folder", folder=str(tmp_path / "none")))


# -- stage -------------------------------------------------------------------------------------------------------
def bg_cfg(tmp_path, **extra):
    root = tmp_path / "toy"
    if not root.exists():
        make_voc_dataset(root, background=True)
    return load_config(None, fast_overrides(root, tmp_path / "runs", **{"pseudo.refiners": "[saliency]", **extra}))


def seed_part_maps(ctx: RunContext, splits=("train", "val")) -> None:
    """A complete maps stage (so no classifier is trained): per image, maps that cover only the top-left quarter of
    each object -- the CAM failure saliency is meant to fix -- and a weak uniform score elsewhere."""
    stage = Pipeline(ctx).stage(MAPS)
    stage.open()
    for split in splits:
        for s in ctx.reader.samples(split):
            gt = ctx.reader.load_mask(s)
            classes = np.array(sorted(s.labels))
            maps = []
            for c in classes:
                ys, xs = np.nonzero(gt == c)
                m = np.full(gt.shape, 0.05, np.float32)
                m[ys.min() : (ys.min() + ys.max()) // 2, xs.min() : (xs.min() + xs.max()) // 2] = 1.0
                maps.append(m)
            save_maps(stage.dir / split / f"{s.id}.npz", np.stack(maps), classes, np.zeros(ctx.spec.num_fg))
    stage.finish(splits={ctx.split_name(r): {"seeded": True} for r in ctx.cfg.maps.splits})  # covers maps.splits


def pseudo_on_seeded_maps(ctx: RunContext):
    """The pseudo stage on the maps stage a test seeded: complete under its key, it needs no classifier."""
    return run_stage(ctx, PSEUDO)


def masks_and_truth(ctx, stage):
    out = []
    for s in ctx.reader.samples("train"):
        out.append((np.asarray(Image.open(stage.dir / "train" / f"{s.id}.png")), ctx.reader.load_mask(s)))
    return out


def accuracy(pairs) -> float:
    return sum(((m == t) & (t != 255)).sum() for m, t in pairs) / sum((t != 255).sum() for _, t in pairs)


def test_saliency_masks_recover_object_extent_the_maps_miss(tmp_path):
    # frequency-tuned: these toy objects are large uniform colour regions, which it finds whole; the spectral
    # residual highlights their edges only (on this data 0.61 accuracy vs the maps' 0.81)
    ctx = RunContext(bg_cfg(tmp_path, **{"saliency.source": "frequency_tuned"}))
    seed_part_maps(ctx)
    stage = pseudo_on_seeded_maps(ctx)
    assert not (ctx.run_dir / "cls").exists()  # the seeded maps were used
    info = json.loads((stage.dir / "stage.json").read_text())
    assert info["refiners"] == ["saliency"] and info["saliency_chosen_on"] == "val"
    assert info["saliency_threshold"] in ctx.cfg.eval.sweep and info["images"] == 8
    assert "bg_threshold" in info  # still chosen: evaluate scores the raw maps with it
    sal_acc = accuracy(masks_and_truth(ctx, stage))
    cam_ctx = RunContext(bg_cfg(tmp_path, **{"pseudo.refiners": "[]"}))
    cam_acc = accuracy(masks_and_truth(cam_ctx, pseudo_on_seeded_maps(cam_ctx)))  # same maps, best threshold on val
    assert sal_acc > cam_acc + 0.03 and sal_acc > 0.9, (sal_acc, cam_acc)


def test_saliency_pseudo_stage_end_to_end_with_a_trained_classifier_and_crf(tmp_path):
    cfg = bg_cfg(tmp_path, **{"train.epochs": 1, "saliency.source": "frequency_tuned",
                              "pseudo.refiners": "[saliency, crf]", "crf.workers": 0, "saliency.ignore_band": 0.02,
                              "eval.sweep": "[0.2, 0.4, 0.6]", "maps.splits": "[train, val]"})
    ctx = RunContext(cfg)
    stage = run_stage(ctx, "pseudo")
    assert (ctx.run_dir / "cls" / "model.pt").exists()
    info = stage.info()
    assert info["complete"] and info["refiners"] == ["saliency", "crf"]
    assert info["saliency_threshold"] in (0.2, 0.4, 0.6)
    pairs = masks_and_truth(ctx, stage)
    assert len(pairs) == 8
    values = set(np.unique(np.concatenate([m.ravel() for m, _ in pairs])).tolist())
    assert values <= {0, 1, 2, 3, 255} and 0 in values
    # ground-truth background is found as background (saliency decides extent; the classifier barely trained)
    bg_hit = sum(((m == 0) & (t == 0)).sum() for m, t in pairs) / sum((t == 0).sum() for _, t in pairs)
    assert bg_hit > 0.8, bg_hit
    # the saliency threshold's choice lands in metrics.json beside the background threshold's
    from wsss.stages import pipeline

    no_seg = dataclasses.replace(cfg, seg=dataclasses.replace(cfg.seg, enabled=False))
    sel = pipeline.run(RunContext(no_seg), "eval")["eval"]["selection"]
    assert sel["saliency_threshold"] == info["saliency_threshold"] and sel["saliency_chosen_on"] == "val"


def test_model_saliency_is_computed_once_per_image_and_reused_when_the_pseudo_stage_is_redone(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from wsss.saliency.onnx_model import OnnxSaliency

    model = mean_sigmoid_model(tmp_path / "sal.onnx")
    cache = tmp_path / "salcache"
    sal = {"saliency.source": "onnx", "saliency.onnx_path": model, "saliency.cache_dir": str(cache)}
    ctx = RunContext(bg_cfg(tmp_path, **sal))
    seed_part_maps(ctx)
    runs = []
    forward = OnnxSaliency.forward
    monkeypatch.setattr(OnnxSaliency, "forward", lambda self, x: runs.append(1) or forward(self, x))
    first = run_stage(ctx, PSEUDO)
    assert len(runs) == 12  # train (8) and val (4, the threshold's sweep): once each, up front; then read back
    assert len(list((cache / "maps").glob("onnx-*/*.png"))) == 12
    # another fusion setting: the pseudo stage is redone, the saliency read back
    again = RunContext(bg_cfg(tmp_path, **sal, **{"saliency.ignore_band": 0.02}))
    second = run_stage(again, PSEUDO)
    assert second.info()["complete"] and len(runs) == 12
    assert second.info()["saliency_threshold"] == first.info()["saliency_threshold"]
    # where the maps are kept is in no key
    key = Pipeline(ctx).key(PSEUDO)
    assert key == Pipeline(RunContext(bg_cfg(tmp_path, **{**sal, "saliency.cache_dir": str(tmp_path / "x"),
                                                           "saliency.cache_maps": False}))).key(PSEUDO)


def test_saliency_settings_key_the_pseudo_stage_only_when_used(tmp_path):
    def key(**extra):
        return Pipeline(RunContext(bg_cfg(tmp_path, **extra))).key(PSEUDO)

    cam = key(**{"pseudo.refiners": "[]"})
    assert cam == key(**{"pseudo.refiners": "[]", "saliency.threshold": 0.3})
    sal = key()
    assert sal != cam
    assert sal != key(**{"saliency.threshold": 0.3})
    assert sal != key(**{"saliency.source": "frequency_tuned"})
    # options of a source that is not used, and the CRF's gt_prob without the CRF, change nothing
    assert sal == key(**{"saliency.onnx_output": "logit", "pseudo.options.crf.gt_prob": 0.9})
    assert key(**{"pseudo.refiners": "[saliency, crf]"}) != key(**{"pseudo.refiners": "[saliency, crf]",
                                                                   "pseudo.options.crf.gt_prob": 0.9})
    # a folder source's key follows the files in it
    folder = tmp_path / "maps_png"
    folder.mkdir()
    k = saliency_key(SaliencyConfig(source="folder", folder=str(folder)))
    Image.fromarray(np.zeros((2, 2), np.uint8), "L").save(folder / "x.png")
    assert saliency_key(SaliencyConfig(source="folder", folder=str(folder))) != k


def test_saliency_problems_are_reported_before_training(tmp_path):
    folder = tmp_path / "sal"
    folder.mkdir()
    ctx = RunContext(bg_cfg(tmp_path, **{"saliency.source": "folder", "saliency.folder": str(folder)}))
    with pytest.raises(DataError, match="no saliency map <id>.png for 12 of 12 images: img000, img001"):
        run_stage(ctx, "pseudo")  # train (8) + val (4, for the threshold) checked up front
    assert not (ctx.run_dir / "cls").exists()
    no_bg = make_voc_dataset(tmp_path / "nobg")
    ctx = RunContext(load_config(None, fast_overrides(no_bg, tmp_path / "runs2", **{"pseudo.refiners": "[saliency]"})))
    with pytest.raises(ConfigError, match="need a dataset with a background class"):
        run_stage(ctx, "pseudo")
    assert not (ctx.run_dir / "cls").exists()
