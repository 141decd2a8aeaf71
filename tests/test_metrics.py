import numpy as np
import pytest

from wsss.data.spec import DatasetSpec
from wsss.evaluation import ThresholdSweep, average_precision, confusion_matrix, segmentation_scores
from wsss.pseudo import pseudo_mask


def test_confusion_and_scores_hand_computed():
    gt = np.array([0, 0, 1, 1, 2, 255, 1])
    pred = np.array([0, 1, 1, 1, 2, 0, 255])  # the 255 prediction is an unlabelled pixel: counted nowhere
    conf = confusion_matrix(gt, pred, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    s = segmentation_scores(conf, ["a", "b", "c"])
    # IoU a = 1/(2+1-1) = 0.5, b = 2/(2+3-2) = 2/3, c = 1
    assert s["per_class"]["a"]["iou"] == 50.0
    assert s["per_class"]["b"]["iou"] == pytest.approx(66.67, abs=0.01)
    assert s["miou"] == pytest.approx((50 + 200 / 3 + 100) / 3, abs=0.01)
    assert s["pixel_acc"] == 80.0
    # recall a = 1/2, b = 1, c = 1 -> class-average accuracy 83.33; precision b = 2/3
    assert s["class_avg_acc"] == pytest.approx(83.33, abs=0.01)
    assert s["per_class"]["b"]["precision"] == pytest.approx(66.67, abs=0.01)


def test_absent_class_is_excluded_from_mean():
    conf = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 3)
    s = segmentation_scores(conf, ["a", "b", "c"])
    assert s["per_class"]["c"]["iou"] is None
    assert s["miou"] == 100.0


def test_split_score_is_one_matrix_not_mean_of_images():
    # image 1: 1 pixel of class 1 wrong; image 2: 99 pixels of class 1 right
    c1 = confusion_matrix(np.array([1]), np.array([0]), 2)
    c2 = confusion_matrix(np.ones(99, int), np.ones(99, int), 2)
    s = segmentation_scores(c1 + c2, ["a", "b"])
    assert s["per_class"]["b"]["iou"] == 99.0  # 99 / (100 + 99 - 99); a mean of per-image IoUs would say 50


def test_average_precision_hand_computed():
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    # ranks: hit at 1 (P=1), miss, hit at 3 (P=2/3) -> AP = (1 + 2/3) / 2
    assert average_precision(scores, targets)[0] == pytest.approx((1 + 2 / 3) / 2)


def test_pseudo_mask_background_threshold_and_ignore_band():
    spec = DatasetSpec("t", ("background", "cat", "dog"), background=0)
    maps = np.array([[[0.9, 0.3, 0.1, 0.5]], [[0.2, 0.4, 0.05, 0.25]]], np.float32)  # (P=2, 1, 4)
    classes = np.array([1, 2])
    m = pseudo_mask(maps, classes, spec, bg_threshold=0.35)
    assert m.tolist() == [[1, 2, 0, 1]]
    m = pseudo_mask(maps, classes, spec, bg_threshold=0.35, ignore_below=0.2)
    assert m.tolist() == [[1, 2, 0, 1]]  # 0.1 is confidently background
    m = pseudo_mask(maps, classes, spec, bg_threshold=0.45, ignore_below=0.2)
    assert m.tolist() == [[1, 255, 0, 1]]  # 0.4 is in the uncertain band


def test_pseudo_mask_without_background_is_argmax_over_image_classes():
    spec = DatasetSpec("t", ("grass", "cow", "sky"), background=None)
    maps = np.array([[[0.9, 0.1]], [[0.2, 0.15]]], np.float32)
    m = pseudo_mask(maps, np.array([0, 2]), spec)
    assert m.tolist() == [[0, 2]]
    m = pseudo_mask(maps, np.array([0, 2]), spec, ignore_below=0.16)
    assert m.tolist() == [[0, 255]]


def test_sweep_equals_separate_evaluations():
    rng = np.random.default_rng(0)
    spec = DatasetSpec("t", ("background", "cat", "dog"), background=0)
    thresholds = [0.2, 0.5, 0.8]
    sweep = ThresholdSweep(spec, thresholds)
    data = []
    for _ in range(3):
        maps = rng.random((2, 5, 6)).astype(np.float32)
        gt = rng.integers(0, 3, (5, 6))
        data.append((maps, gt))
        sweep.add(maps, np.array([1, 2]), gt)
    res = sweep.results()
    for i, t in enumerate(thresholds):
        conf = sum(confusion_matrix(gt, pseudo_mask(m, np.array([1, 2]), spec, t), 3) for m, gt in data)
        assert res[i]["miou"] == segmentation_scores(conf, spec.classes)["miou"]
    assert sweep.best()["miou"] == max(r["miou"] for r in res)
