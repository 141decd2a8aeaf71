"""Self-training rounds (wsss.stages.self_train): label restriction, the confidence rule and its choice on val, the
rounds as resumable stages keyed so that a change recomputes only the rounds after it."""

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import load_config
from wsss.errors import ConfigError
from wsss.stages import self_train
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline, run_stage
from wsss.stages.self_train import (
    BINS,
    ConfidenceValue,
    _save_confidence,
    allowed_classes,
    choose_rule,
    class_thresholds,
    filtered,
    restrict,
)

from conftest import Killed, fast_overrides, make_voc_dataset


def test_restrict_never_yields_a_class_absent_from_the_labels():
    spec = type("S", (), {"num_classes": 4, "background": None})()
    probs = np.zeros((4, 2, 3), np.float32)
    probs[3] = 0.9  # the network favours class 3 everywhere
    probs[1, 0] = 0.06
    probs[2] = 0.04
    probs[1, 1] = 0.02
    out = restrict(probs, allowed_classes([1, 2], spec))
    assert out[3].max() == 0 and out[0].max() == 0
    np.testing.assert_allclose(out.sum(0), 1, rtol=1e-6)
    assert (out.argmax(0)[0] == 1).all() and (out.argmax(0)[1] == 2).all()
    # with a background class, background stays allowed
    bg_spec = type("S", (), {"num_classes": 4, "background": 0})()
    assert allowed_classes([2], bg_spec).tolist() == [True, False, True, False]
    # nothing allowed: nothing to label
    assert restrict(probs, allowed_classes([], spec)) is None
    # every allowed class at 0: uniform over the allowed ones, never a NaN
    zero = restrict(np.eye(4, dtype=np.float32)[3][:, None, None] * np.ones((4, 1, 2), np.float32),
                    allowed_classes([0, 1], spec))
    np.testing.assert_allclose(zero[:, 0, 0], [0.5, 0.5, 0, 0])


def test_filtered_ignores_pixels_under_their_class_threshold():
    label = np.array([[1, 1, 2], [2, 0, 255]], np.uint8)
    conf = np.array([[0.9, 0.5, 0.7], [0.6, 0.2, 0.99]], np.float32)
    out = filtered(label, conf, np.array([0.1, 0.6, 0.65], np.float32), 255)
    assert out.tolist() == [[1, 255, 2], [255, 0, 255]]


def test_quantile_thresholds_drop_that_fraction_of_each_class():
    rng = np.random.default_rng(0)
    hist = np.zeros((3, BINS), np.int64)
    c1 = rng.uniform(0.4, 1.0, 10000)  # class 1: confidences uniform on [0.4, 1)
    np.add.at(hist, (1, (c1 * BINS).astype(int)), 1)
    t = class_thresholds("quantile", 0.25, hist, 3)
    assert t[0] == 0 and t[2] == 0  # classes never predicted keep everything
    assert abs(t[1] - 0.55) < 0.01  # 25% of U(0.4, 1) lies below 0.55
    assert (c1 < t[1]).mean() == pytest.approx(0.25, abs=0.01)
    assert class_thresholds("threshold", 0.7, None, 3).tolist() == pytest.approx([0.7] * 3)
    assert class_thresholds("none", None, None, 3).tolist() == [0, 0, 0]


def test_confidence_value_on_a_hand_computed_case():
    gt = np.array([[0, 0, 0, 0], [1, 1, 255, 1]], np.uint8)  # class 0: 4 pixels, class 1: 3
    keep_all = np.array([[0, 0, 1, 1], [1, 0, 0, 1]], np.uint8)  # class 0: 2 right 2 wrong; class 1: 2 right 1 wrong
    strict = np.array([[0, 0, 255, 255], [1, 255, 255, 1]], np.uint8)  # class 0: 2 right; class 1: 2 right
    acc = ConfidenceValue(2, 2, 255)
    acc.add(gt, [keep_all, strict])
    v = acc.values()
    assert v[0] == pytest.approx(((2 - 2) / 4 + (2 - 1) / 3) / 2)
    assert v[1] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert acc.kept().tolist() == [True, True]


def _toy(tmp_path, **extra):
    root = make_voc_dataset(tmp_path / "toy")
    return load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.rounds": 2, **extra}))


def test_the_rule_is_chosen_on_val_from_its_labels(tmp_path):
    """Val labels that are right exactly where their probability is 0.8 and wrong where it is 0.4: the rule keeps
    the first and drops the second (0.6), not everything (0.0) nor nothing (0.95)."""
    cfg = _toy(tmp_path, **{"self_train.candidates": "[0.0, 0.6, 0.95]"})
    ctx = RunContext(cfg)
    folder = tmp_path / "conf"
    for s in ctx.reader.samples("val"):
        gt = ctx.reader.load_mask(s)
        label = gt.copy()
        label[label == 255] = 0
        conf = np.full(gt.shape, 0.8, np.float32)
        wrong = np.zeros(gt.shape, bool)
        wrong[:, ::3] = True
        label[wrong] = (label[wrong] + 1) % 4
        conf[wrong] = 0.4
        _save_confidence(folder / f"{s.id}.npz", label, conf)
    # every val file exists, so no network is needed
    choice = choose_rule(ctx, None, None, folder)
    assert choice["value"] == 0.6 and choice["chosen_on"] == "val"
    assert choice["values"]["0.95"] is None  # keeps nothing: never chosen
    assert choice["values"]["0.6"] > choice["values"]["0.0"]


class FavoursBlue(torch.nn.Module):
    """A stand-in segmentation network: class 3 (blue) wins everywhere, class 1 (red) is second on the left half,
    class 2 (green) on the right half, with a confidence that falls from left to right."""

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 4, h, w)
        logits[:, 3] = 5.0
        ramp = torch.linspace(3.0, 0.0, w)
        logits[:, 1, :, : w // 2] = ramp[: w // 2]
        logits[:, 2, :, w // 2:] = ramp[w // 2:]
        return {"logits": logits}


def test_relabelled_masks_keep_to_the_labels_and_ignore_low_confidence(tmp_path, monkeypatch):
    cfg = _toy(tmp_path, **{"self_train.threshold": 0.6, "self_train.scales": "[1.0]", "self_train.flip": False})
    ctx = RunContext(cfg)
    run_stage(ctx, "seg")
    monkeypatch.setattr(self_train.seg_stage, "segmenter_on_device",
                        lambda ctx, stage: (FavoursBlue(), torch.device("cpu")))
    stage = run_stage(ctx, "relabel_r2")
    info = stage.info()
    assert info["rule"] == "threshold" and info["rule_value"] == 0.6 and info["chosen_on"] == "config"
    samples = ctx.reader.samples("train")
    checked = 0
    for s in samples:
        mask = np.asarray(Image.open(stage.dir / "train" / f"{s.id}.png"))
        present = set(np.unique(mask).tolist()) - {255}
        assert present <= set(s.labels), (s.id, present, s.labels)  # blue never, unless labelled
        with np.load(stage.dir / "confidence" / "train" / f"{s.id}.npz") as z:
            conf = z["conf"].astype(np.float32)
        assert ((mask == 255) == (conf < 0.6)).all()  # exactly the pixels under the threshold are ignored
        checked += 3 not in s.labels
    assert checked > 0  # the toy set has images without blue
    assert 0 < info["kept_fraction"] < 1


def test_agreement_keeps_the_previous_masks_where_the_network_agrees_and_ignores_the_rest(tmp_path, monkeypatch):
    cfg = _toy(tmp_path, **{"self_train.masks": "agreement", "self_train.confidence": "none",
                            "self_train.scales": "[1.0]", "self_train.flip": False})
    ctx = RunContext(cfg)
    run_stage(ctx, "seg")
    monkeypatch.setattr(self_train.seg_stage, "segmenter_on_device",
                        lambda ctx, stage: (FavoursBlue(), torch.device("cpu")))
    stage = run_stage(ctx, "relabel_r2")
    assert stage.info()["masks"] == "agreement"
    pseudo = Pipeline(ctx).stage("pseudo")
    agree = disagree = 0
    for s in ctx.reader.samples("train"):
        mask = np.asarray(Image.open(stage.dir / "train" / f"{s.id}.png"))
        before = np.asarray(Image.open(pseudo.dir / "train" / f"{s.id}.png"))
        with np.load(stage.dir / "confidence" / "train" / f"{s.id}.npz") as z:
            net = z["label"]
        same = (net == before) & (before != 255)
        assert (mask[same] == before[same]).all()  # kept: the previous label, unchanged
        assert (mask[~same] == 255).all()  # the network disagrees: ignore, never the network's label
        agree, disagree = agree + int(same.sum()), disagree + int((~same).sum())
    assert agree > 0 and disagree > 0
    # the option keys the relabelling: switching back to the network's labels is another variant
    other = RunContext(load_config(None, _overrides(cfg) + ["self_train.masks=network"]))
    assert Pipeline(other).stage("relabel_r2").key != stage.key


def test_a_killed_round_resumes_and_a_change_recomputes_only_later_rounds(tmp_path, caplog):
    cfg = _toy(tmp_path, **{"seg.train.epochs": 2, "self_train.threshold": 0.0})
    calls = []

    def kill_in_round_2(epoch):
        calls.append(epoch)
        if len(calls) == 5:  # the classifier: epochs 1, 2; round 1: epochs 1, 2; round 2: epoch 1
            raise Killed

    with pytest.raises(Killed):
        run_stage(RunContext(cfg, after_epoch=kill_in_round_2), "eval")
    d = RunContext(cfg).run_dir
    assert (d / "seg_r2" / "last.ckpt").exists() and not (d / "seg_r2" / "model.pt").exists()
    seg1 = (d / "seg" / "model.pt").stat().st_mtime_ns
    relabel = next((d / "relabel_r2" / "train").glob("*.png")).stat().st_mtime_ns
    with caplog.at_level("INFO"):
        metrics = run_stage(RunContext(cfg), "eval")
    assert "resuming" in caplog.text and str((d / "seg_r2").resolve()) in caplog.text
    assert (d / "seg" / "model.pt").stat().st_mtime_ns == seg1
    rounds = metrics["self_training"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["masks"]["rule_value"] == 0.0 and set(rounds[1]["network"]) == {"val", "test"}
    assert metrics["seg"]["miou"] == rounds[1]["network"]["test"]["miou"]  # pred is the last round's network

    # init changes: round 2's network retrains, its masks and round 1 are reused
    p = Pipeline(RunContext(load_config(None, [*_overrides(cfg), "self_train.init=previous"])))
    seg2 = (d / "seg_r2" / "model.pt").stat().st_mtime_ns
    p.run()
    assert next((d / "relabel_r2" / "train").glob("*.png")).stat().st_mtime_ns == relabel
    assert (d / "seg" / "model.pt").stat().st_mtime_ns == seg1
    assert (d / "seg_r2" / "model.pt").stat().st_mtime_ns != seg2
    # one round more: every earlier round reused
    seg2 = (d / "seg_r2" / "model.pt").stat().st_mtime_ns
    p = Pipeline(RunContext(load_config(None, [*_overrides(cfg), "self_train.init=previous", "self_train.rounds=3"])))
    assert p.order[3:9] == ["seg", "relabel_r2", "seg_r2", "relabel_r3", "seg_r3", "pred"]
    p.run()
    assert (d / "seg_r2" / "model.pt").stat().st_mtime_ns == seg2
    assert (d / "seg_r3" / "model.pt").exists()


def _overrides(cfg) -> list[str]:
    return fast_overrides(cfg.data.root, cfg.runs_dir, **{"self_train.rounds": 2, "seg.train.epochs": 2,
                                                          "self_train.threshold": 0.0})


def test_bad_settings_fail_at_load_or_before_anything_runs(tmp_path):
    root = make_voc_dataset(tmp_path / "toy", splits=(("train", 4), ("val", 2), ("test", 2)))
    with pytest.raises(ConfigError, match="self_train.rounds"):
        load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.rounds": 0}))
    with pytest.raises(ConfigError, match="self_train.confidence"):
        load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.confidence": "loose"}))
    with pytest.raises(ConfigError, match="self_train.threshold"):
        load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.threshold": 1.5}))
    agree = load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.rounds": 2,
                                                                        "self_train.masks": "agreement"}))
    with pytest.raises(ConfigError, match="self_train.threshold: null .* self_train.confidence: none"):
        Pipeline(RunContext(agree)).run()
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{"self_train.rounds": 2, "seg.masks": "gt"}))
    with pytest.raises(ConfigError, match="seg.masks: pseudo"):
        Pipeline(RunContext(cfg)).run()
    assert not (RunContext(cfg).run_dir / "cls").exists()  # refused before the classifier trained
