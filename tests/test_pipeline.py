"""The whole pipeline on a toy dataset, the run directory, and the config-keyed stage cache."""

import json

import numpy as np
import torch
import yaml
from PIL import Image

from wsss.cli import main
from wsss.config import load_config
from wsss.data.io import load_image
from wsss.data.transforms import to_tensor
from wsss.localize import load_maps
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

from conftest import fast_overrides, make_voc_dataset


def test_run_writes_every_artifact_and_reuses_unchanged_stages(fast_cfg):
    ctx = RunContext(fast_cfg(**{"train.epochs": 1}))
    metrics = run_stage(ctx, "eval")
    d = ctx.run_dir
    resolved = yaml.safe_load((d / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and "poly_power" in resolved["train"]  # every default written out
    assert (d / "cls" / "model.pt").exists()
    m = load_maps(next((d / "maps" / "train").glob("*.npz")))
    assert m["maps"].dtype == np.float32 and m["maps"].max() <= 1.0 + 1e-3
    with np.load(next((d / "maps" / "train").glob("*.npz"))) as z:
        assert z["maps_u8_delta"].dtype == np.uint8  # the compact format (wsss.localize.store)
    png = Image.open(next((d / "pseudo" / "train").glob("*.png")))
    assert png.mode == "P"
    saved = json.loads((d / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved["splits"]) == {"train", "val", "test"}
    assert saved["splits"]["test"]["maps"]["miou"] is not None
    assert saved["pseudo"]["split"] == "train"

    model_mtime = (d / "cls" / "model.pt").stat().st_mtime_ns
    map_file = next((d / "maps" / "train").glob("*.npz"))
    map_mtime = map_file.stat().st_mtime_ns
    run_stage(RunContext(fast_cfg(**{"train.epochs": 1})), "eval")
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == model_mtime
    assert map_file.stat().st_mtime_ns == map_mtime

    # a maps setting changes: maps recomputed, classifier reused
    run_stage(RunContext(fast_cfg(**{"train.epochs": 1, "maps.flip": False})), "eval")
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == model_mtime
    assert map_file.stat().st_mtime_ns != map_mtime


def test_background_threshold_chosen_on_val_and_recorded(tmp_path):
    root = make_voc_dataset(tmp_path / "bg", background=True)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{"train.epochs": 1,
                                                                      "eval.sweep": "[0.1, 0.3, 0.5]"}))
    metrics = run_stage(RunContext(cfg), "eval")
    sel = metrics["selection"]
    assert sel["chosen_on"] == "val" and sel["bg_threshold"] in (0.1, 0.3, 0.5)
    val_sweep = metrics["splits"]["val"]["sweep"]
    assert max(val_sweep, key=lambda r: r["miou"])["threshold"] == sel["bg_threshold"]
    assert [r["threshold"] for r in metrics["splits"]["test"]["sweep"]] == [0.1, 0.3, 0.5]


def test_cli_run_prints_numbers(toy_root, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "cli"}))
    args = [a for a in fast_overrides(toy_root, tmp_path / "runs", **{"train.epochs": 1}) if not a.startswith("name=")]
    assert main(["run", str(cfg), *args]) == 0
    out = capsys.readouterr().out
    assert "map mIoU" in out and "metrics.json" in out
    assert (tmp_path / "runs" / "cli" / "metrics.json").exists()


def test_pred_labels_mode_uses_classifier_scores(fast_cfg):
    # pretrained: an untrained backbone's scores all sit at sigmoid(0) = 0.5, on either side of any threshold by noise
    settings = {"train.epochs": 1, "model.pretrained": True, "maps.labels": "pred", "maps.splits": "[val]"}
    ctx = RunContext(fast_cfg(**settings))
    model = maps_stage.inference_model(ctx, run_stage(ctx, "cls").dir / "model.pt")
    samples = ctx.reader.samples("val")
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.stack([to_tensor(load_image(s.image)) for s in samples]))["logits"]).numpy()
    # a threshold in the widest gap between the scores (which classes pass cannot hinge on float rounding) among those
    # that pass other classes than the default 0.5 does
    p = np.sort(scores.ravel())
    gaps = [(hi - lo, float(lo + hi) / 2) for lo, hi in zip(p[:-1], p[1:])]
    width, threshold = max(g for g in gaps if (scores > g[1]).sum() != (scores > 0.5).sum())
    assert width > 0.02, p
    fg_ids = np.asarray(ctx.spec.fg_ids)
    want = {s.id: set(fg_ids[row > threshold].tolist()) for s, row in zip(samples, scores, strict=True)}
    assert any(want[s.id] != set(s.labels) for s in samples)  # the scores, not the image labels, decide here

    stage = run_stage(RunContext(fast_cfg(**settings, **{"maps.pred_threshold": threshold})), "maps")
    got = {s.id: set(load_maps(stage.dir / "val" / f"{s.id}.npz")["classes"].tolist()) for s in samples}
    assert got == want, (threshold, scores)


def test_variants_sit_side_by_side_and_gc_removes_what_the_latest_config_does_not_use(fast_cfg, capsys, caplog):
    """Weak run, then the upper bound in the same run: classifier, maps and pseudo masks reused, the weak network
    and its scores kept; switching a setting back reuses its first variant; gc removes only unused variants."""
    weak = RunContext(fast_cfg())
    d = weak.run_dir
    m_weak = run_stage(weak, "eval")
    seg_weak = (d / "seg").resolve()
    maps_first = (d / "maps").resolve()
    cls_mtime = (d / "cls" / "model.pt").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="wsss.pipeline"):
        m_gt = run_stage(RunContext(fast_cfg(**{"seg.masks": "gt"})), "eval")
    for stage in ("maps", "pseudo"):  # complete, so the classifier before them is not even looked at
        assert f"{stage}: reusing" in caplog.text
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == cls_mtime
    assert m_gt["stage_keys"]["cls"] == m_weak["stage_keys"]["cls"]
    assert (d / "seg").resolve() != seg_weak and (seg_weak / "model.pt").exists()  # the weak network is kept
    kept = {p.stem: json.loads(p.read_text()) for p in (d / "metrics").glob("*.json")}
    assert {m["seg"]["masks"] for m in kept.values()} == {"pseudo", "gt"}  # and the weak scores
    assert kept[m_weak["metrics_key"]]["seg"]["miou"] == m_weak["seg"]["miou"]

    # a maps setting changed and changed back: the first maps are reused, not recomputed
    map_file = next((maps_first / "train").glob("*.npz"))
    mtime = map_file.stat().st_mtime_ns
    run_stage(RunContext(fast_cfg(**{"seg.masks": "gt", "maps.flip": False})), "maps")
    assert (d / "maps").resolve() != maps_first
    run_stage(RunContext(fast_cfg(**{"seg.masks": "gt"})), "eval")
    assert (d / "maps").resolve() == maps_first and map_file.stat().st_mtime_ns == mtime

    assert main(["runs", str(d)]) == 0
    listing = capsys.readouterr().out
    assert seg_weak.name in listing and "evaluations kept" in listing
    assert main(["gc", str(d), "--yes"]) == 0
    assert not seg_weak.exists()
    assert sorted(p.name for p in (d / "store" / "maps").iterdir()) == [maps_first.name]  # the flip variant is gone
    assert (d / "seg" / "model.pt").exists() and (d / "cls" / "model.pt").exists()


def test_a_split_added_to_maps_splits_extends_the_maps_instead_of_recomputing_them(fast_cfg):
    d = RunContext(fast_cfg()).run_dir
    run_stage(RunContext(fast_cfg(**{"maps.splits": "[train, val]"})), "pseudo")
    variant = (d / "maps").resolve()
    train_file = next((d / "maps" / "train").glob("*.npz"))
    mtime = train_file.stat().st_mtime_ns
    pseudo = (d / "pseudo").resolve()
    run_stage(RunContext(fast_cfg(**{"maps.splits": "[train, val, test]"})), "maps")
    assert (d / "maps").resolve() == variant and train_file.stat().st_mtime_ns == mtime  # extended in place
    info = json.loads((variant / "stage.json").read_text())
    assert set(info["splits"]) == {"train", "val", "test"} and info["splits"]["test"]["computed"] == 4
    stage = run_stage(RunContext(fast_cfg(**{"maps.splits": "[train, val, test]"})), "pseudo")
    assert stage.dir == pseudo  # the pseudo masks depend on no split list: reused
    run_stage(RunContext(fast_cfg(**{"maps.splits": "[val]"})), "maps")  # fewer splits: covered, nothing computed
    assert train_file.stat().st_mtime_ns == mtime and (d / "maps").resolve() == variant
