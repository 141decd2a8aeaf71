"""Issue #17: the label check before training and the trivial baselines beside every score.

Hand-computed baselines on tiny masks; a dataset whose every image holds every class (the run warns naming the
classes, refuses without ``label_check.force``, and its metrics.json holds baselines equal to values computed by
hand); the summary line that says "below"; the report's reference lines."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_report import parse
from wsss.cli import main
from wsss.data.label_check import check_labels
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.evaluation.baselines import BaselineScorer, cell_shares, training_stats
from wsss.report import write_report
from wsss.stages.evaluate import summary_lines

from conftest import MSRC, fast_overrides

IGN = 255


def _pct(x: float) -> float:
    return round(100 * x, 2)


# -- the baselines by hand -------------------------------------------------------------------------------------------
def test_cell_shares_area_average_and_small_masks():
    m = np.array([[0, 0, 1, 1, 1, 1],
                  [0, 1, 1, 1, IGN, IGN],
                  [2, 2, 2, 2, 2, 2],
                  [2, 2, 2, 2, 2, 2]], np.uint8)  # 4x6 on a 2x2 grid: cells of 2 rows x 3 columns
    s = cell_shares(m, 3, IGN, grid=2)
    assert np.allclose(s[0], [3 / 6, 3 / 6, 0]) and np.allclose(s[1], [0, 1, 0])  # ignore pixels count nowhere
    assert np.allclose(s[2], [0, 0, 1]) and np.allclose(s[3], [0, 0, 1])
    # a mask smaller than the grid is enlarged, so every cell holds its pixel's class
    assert np.allclose(cell_shares(np.array([[1]], np.uint8), 3, IGN, grid=2), [[0, 1, 0]] * 4)


def test_baselines_equal_hand_computed_values():
    # classes a=0, b=1, c=2, no background; 2x2 masks on a 2x2 grid (one pixel per cell)
    train = [(np.array([[0, 0], [1, 1]]), (0, 1)),
             (np.array([[0, 0], [0, 2]]), (0, 2)),
             (np.array([[1, 1], [1, 1]]), (1,))]
    stats = training_stats(((m.astype(np.uint8), lab) for m, lab in train), 3, IGN, None, grid=2)
    assert stats.frequency.tolist() == [5, 6, 1] and stats.most_frequent == 1 and stats.images == 3
    # per class, the mean of its mask over the training masks that hold it (a: 2 masks, b: 2, c: 1)
    assert np.allclose(stats.prior, [[1, 0.5, 0], [1, 0.5, 0], [0.5, 1, 0], [0, 1, 1]])

    scorer = BaselineScorer(stats, 3, IGN, None)
    scorer.add(np.array([[0, 0], [2, 2]], np.uint8), (0, 2))
    scorer.add(np.array([[1, IGN], [1, 1]], np.uint8), (1,))
    # most frequent (b) everywhere: gt a 2 px, b 3 px, c 2 px all predicted b
    assert scorer.conf["most_frequent"].tolist() == [[0, 2, 0], [0, 3, 0], [0, 2, 0]]
    # labels + frequency: image 1 {a, c} -> a (5 px > 1 px in training); image 2 {b} -> b
    assert scorer.conf["label_frequency"].tolist() == [[2, 0, 0], [0, 3, 0], [2, 0, 0]]
    # spatial prior: image 1 cells a, a, a (0.5 > 0), c (1 > 0) -> c's bottom-right pixel right, bottom-left wrong
    assert scorer.conf["spatial_prior"].tolist() == [[2, 0, 0], [0, 3, 0], [1, 0, 1]]
    scores = scorer.scores(["a", "b", "c"])
    assert scores["most_frequent"]["miou"] == _pct((0 + 3 / 7 + 0) / 3)
    assert scores["label_frequency"]["miou"] == _pct((2 / 4 + 1 + 0) / 3)
    assert scores["label_frequency"]["pixel_acc"] == _pct(5 / 7)
    assert scores["spatial_prior"]["miou"] == _pct((2 / 3 + 1 + 1 / 2) / 3)
    # the best image-label baseline; the spatial prior (it learns from the training masks) is a reference beside it
    assert scores["best"] == "label_frequency" and scores["images"] == 2


def test_background_competes_in_the_prior_only():
    # background=0, x=1, y=2
    train = [(np.array([[0, 0], [1, 1]], np.uint8), (1,)), (np.array([[0, 0], [0, 2]], np.uint8), (2,))]
    stats = training_stats(train, 3, IGN, 0, grid=2)
    scorer = BaselineScorer(stats, 3, IGN, 0)
    assert stats.most_frequent == 0
    assert scorer.label_frequency_class((1,)) == 1  # the labelled class, never the background
    assert scorer.prior_mask((2, 2), (1,)).tolist() == [[0, 0], [1, 1]]  # background 0.5 < x 1 at the bottom left
    assert scorer.prior_mask((4, 4), (2,)).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]


def test_without_training_masks_frequency_comes_from_labels():
    stats = training_stats([(None, (1,)), (None, (1, 2))], 3, IGN, 0)
    assert stats.source == "image labels" and stats.prior is None
    assert stats.frequency.tolist() == [2, 2, 1]  # background counts as in every image
    scorer = BaselineScorer(stats, 3, IGN, 0)
    assert set(scorer.conf) == {"most_frequent", "label_frequency"}


# -- the label check -------------------------------------------------------------------------------------------------
SPEC = DatasetSpec(name="s", classes=("background", "road", "car", "person", "tree"), background=0)


def _samples(label_sets):
    return [Sample(f"i{k}", Path(f"i{k}.jpg"), None, tuple(lab)) for k, lab in enumerate(label_sets)]


def test_label_check_warns_on_a_minority_and_refuses_on_a_majority():
    ok = check_labels(_samples([(1,), (2,), (1, 3), (4,)]), SPEC)
    assert ok["verdict"] == "ok" and ok["message"] is None and ok["classes"]["road"]["images"] == 50.0
    assert ok["classes"]["background"]["images"] is None  # no image-level label
    warn = check_labels(_samples([(1, 2)] * 9 + [(1, 3)]), SPEC)  # road on 100 %, car on 90 %: 2 of 4 classes
    assert warn["verdict"] == "warn" and warn["common"] == ["road", "car"]
    assert "road (100%), car (90%)" in warn["message"] and "data.to_background=[road,car]" in warn["message"]
    refuse = check_labels(_samples([(1, 2, 3)] * 10), SPEC)  # 3 of 4 classes
    assert refuse["verdict"] == "refuse" and "label_check.force=true" in refuse["message"]
    assert check_labels(_samples([(1, 2, 3)] * 10), SPEC, force=True)["verdict"] == "forced"
    assert check_labels(_samples([(1, 2, 3)] * 10), SPEC, refuse_fraction=0.75)["verdict"] == "warn"


@pytest.mark.skipif(not MSRC.is_dir(), reason=f"{MSRC} not present")
def test_msrc21_passes_quietly():
    from wsss.config.schema import DataConfig
    from wsss.data.readers import open_dataset

    reader = open_dataset(DataConfig(root=str(MSRC)))
    r = check_labels(reader.samples("train"), reader.spec, reader.load_mask)
    assert r["verdict"] == "ok" and not r["common"] and r["masks"] == r["images"] == 273
    assert r["classes"]["grass"]["images"] == 42.9  # the most spread class of MSRC-21
    assert max(v["images"] for v in r["classes"].values()) < 50


# -- a dataset whose every image holds every class -------------------------------------------------------------------
CLASSES = ["road", "building", "sky"]  # mask values 0, 1, 2; no background class
COLOURS = [(90, 90, 90), (180, 120, 60), (110, 160, 230)]
SIZE = 64
#: rows of sky and building (the rest is road): training images, then val and test images
TRAIN_ROWS, HELD_OUT_ROWS = (16, 16), (24, 16)


def _street(root: Path, splits=(("train", 4), ("val", 2), ("test", 2))) -> Path:
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in splits:
        sky, building = TRAIN_ROWS if split == "train" else HELD_OUT_ROWS
        ids = []
        for _ in range(n):
            mask = np.zeros((SIZE, SIZE), np.uint8)  # road
            mask[:sky] = 2
            mask[sky:sky + building] = 1
            img = np.array(COLOURS, np.uint8)[mask] + rng.integers(0, 20, (SIZE, SIZE, 3)).astype(np.uint8)
            mask[0, 0] = IGN
            i = f"s{k:02d}"
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
            Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{i}.png")
            ids.append(i)
            k += 1
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "dataset.json").write_text(json.dumps({"name": "street", "classes": CLASSES, "background": None}))
    return root


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    """The every-class dataset run twice: without the override (refused), then with it (to the end, no seg)."""
    base = tmp_path_factory.mktemp("street")
    root = _street(base / "data")
    cfg = base / "c.yaml"
    cfg.write_text("{}\n")
    args = fast_overrides(root, base / "runs", **{"train.epochs": 1, "seg.enabled": False})
    refused = _cli(["run", str(cfg), *args])
    run_dir = base / "runs" / "t"
    after_refusal = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    handler = _Records()
    logging.getLogger("wsss").addHandler(handler)
    try:
        forced = _cli(["run", str(cfg), *args, "label_check.force=true"])
    finally:
        logging.getLogger("wsss").removeHandler(handler)
    return {"refused": refused, "after_refusal": after_refusal, "forced": forced, "warnings": handler.messages,
            "run_dir": run_dir}


def test_every_class_everywhere_is_refused_naming_the_classes(street):
    rc, _out, err = street["refused"]
    assert rc == 2
    assert "building (100%), road (100%), sky (100%)" in err
    assert "label_check.force=true" in err and "data.to_background" in err
    assert street["after_refusal"] == []  # refused before anything was written


def test_the_override_runs_with_a_warning_and_records_the_check(street):
    rc, out, err = street["forced"]
    assert rc == 0, err
    assert any("building (100%), road (100%), sky (100%)" in m and "Running anyway" in m for m in street["warnings"])
    assert "label check (forced)" in out and "building, road, sky" in out
    metrics = json.loads((street["run_dir"] / "metrics.json").read_text())
    check = metrics["stages"]["cls"]["label_check"]
    assert check["verdict"] == "forced" and check["common"] == ["building", "road", "sky"]
    assert json.loads((street["run_dir"] / "cls" / "stage.json").read_text())["label_check"] == check


def test_baselines_in_metrics_equal_hand_computed_values(street):
    b = json.loads((street["run_dir"] / "metrics.json").read_text())["baselines"]
    assert b["training"]["most_frequent"] == "road" and b["training"]["images"] == 4
    assert set(b["splits"]) == {"train", "val", "test"}
    # per training image: sky 16 rows - the void pixel, building 16 rows, road 32 rows (of 64 pixels)
    sky, building, road = 16 * 64 - 1, 16 * 64, 32 * 64
    train = b["splits"]["train"]
    assert train["most_frequent"]["miou"] == _pct(road / (road + sky + building) / 3)
    assert train["label_frequency"]["miou"] == train["most_frequent"]["miou"]  # every image has every label
    assert train["spatial_prior"]["miou"] == 100.0  # the training masks all have the prior's layout
    # held-out images: sky 24 rows, building 16, road 24; the prior says sky 0-15, building 16-31, road 32-63
    sky, building, road = 24 * 64 - 1, 16 * 64, 24 * 64
    for split in ("val", "test"):
        s = b["splits"][split]
        assert s["images"] == 2 and s["best"] in ("most_frequent", "label_frequency")
        assert s["most_frequent"]["miou"] == s["label_frequency"]["miou"] == _pct(road / (road + sky + building) / 3)
        iou = {"sky": (sky - 512) / sky,  # rows 16-23 of sky are predicted building
               "building": 512 / (building + 1024 - 512),  # rows 24-31 right; 16-23 and 32-39 wrong
               "road": road / (road + 512)}  # rows 32-39 of building are predicted road
        assert s["spatial_prior"]["miou"] == _pct(sum(iou.values()) / 3)
        assert s["spatial_prior"]["per_class"]["building"]["iou"] == _pct(iou["building"])


def test_the_report_draws_the_baselines_as_reference_lines(street):
    page = write_report(street["run_dir"], n_images=1).read_text()
    doc = parse(page)
    metrics = json.loads((street["run_dir"] / "metrics.json").read_text())
    for split in ("train", "val", "test"):  # the sweep: one dotted line per split at its best trivial baseline
        assert doc.find("line", class_="baseline", **{"data-split": split})
    # the per-class bars: a tick per class on the pseudo-mask bars (train) and the test maps' bars
    best = metrics["baselines"]["splits"]["test"]
    ticks = doc.find("line", class_="baseline", **{"data-series": "test"})
    assert [t["data-class"] for t in ticks] == CLASSES
    rx = {t["data-class"]: float(t["x1"]) for t in ticks}
    assert rx["road"] > rx["sky"] == rx["building"]  # road's IoU under "road everywhere" is the only non-zero one
    assert best[best["best"]]["per_class"]["road"]["iou"] > 0
    assert len(doc.find("line", class_="baseline", **{"data-series": "pseudo"})) == 3
    # the label check and the baselines table
    assert doc.find("p", class_="label-check", **{"data-verdict": "forced"})
    assert {r["data-baseline"] for r in doc.find("tr", class_="baseline")} == {"most_frequent", "label_frequency",
                                                                                "spatial_prior"}
    assert doc.find("td", class_="vs-baseline")


# -- the summary -----------------------------------------------------------------------------------------------------
def _metrics(maps_miou: float, seg_miou: float) -> dict:
    per = {"most_frequent": {"miou": 12.5}, "label_frequency": {"miou": 30.0}, "spatial_prior": {"miou": 55.0},
           "best": "label_frequency"}
    return {"run": "r", "method": "cam", "backbone": "b", "localizer": "cam", "dataset": "d", "seed": 0,
            "splits": {"test": {"classifier": {"mAP": 90.0},
                                "maps": {"miou": maps_miou, "class_avg_acc": 1.0, "pixel_acc": 1.0}}},
            "seg": {"split": "test", "backbone": "x", "masks": "pseudo", "miou": seg_miou, "class_avg_acc": 1.0,
                    "pixel_acc": 1.0},
            "baselines": {"splits": {"test": per}}}


def test_summary_says_below_when_a_score_is_below_the_best_trivial_baseline():
    lines = summary_lines(_metrics(maps_miou=20.0, seg_miou=45.0))
    maps_line = next(line for line in lines if "map mIoU" in line)
    seg_line = next(line for line in lines if "segmentation network" in line and "mIoU" in line)
    assert "mIoU 20.0 (below the best trivial baseline 30.0: image labels + class frequency; spatial prior 55.0)" in maps_line
    assert "below" not in seg_line and "best trivial baseline 30.0" in seg_line
    assert any(line.strip().startswith("below a trivial baseline: maps (test).") for line in lines)
    assert not any("below" in line for line in summary_lines(_metrics(60.0, 60.0)))
