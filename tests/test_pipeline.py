"""The whole pipeline on a toy dataset, the run directory, and the config-keyed stage cache."""

import json

import numpy as np
import yaml
from PIL import Image

from wsss.cli import main
from wsss.config import load_config
from wsss.localize import load_maps
from wsss.stages import evaluate
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext

from conftest import fast_overrides, make_voc_dataset


def test_run_writes_every_artifact_and_reuses_unchanged_stages(fast_cfg):
    ctx = RunContext(fast_cfg(**{"train.epochs": 1}))
    metrics = evaluate.run(ctx)
    d = ctx.run_dir
    resolved = yaml.safe_load((d / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1 and "poly_power" in resolved["train"]  # every default written out
    assert (d / "cls" / "model.pt").exists()
    m = load_maps(next((d / "maps" / "train").glob("*.npz")))
    assert m["maps"].dtype == np.float32 and m["maps"].max() <= 1.0 + 1e-3
    with np.load(next((d / "maps" / "train").glob("*.npz"))) as z:
        assert z["maps"].dtype == np.float16
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
    evaluate.run(RunContext(fast_cfg(**{"train.epochs": 1})))
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == model_mtime
    assert map_file.stat().st_mtime_ns == map_mtime

    # a maps setting changes: maps recomputed, classifier reused
    evaluate.run(RunContext(fast_cfg(**{"train.epochs": 1, "maps.flip": False})))
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == model_mtime
    assert map_file.stat().st_mtime_ns != map_mtime


def test_background_threshold_chosen_on_val_and_recorded(tmp_path):
    root = make_voc_dataset(tmp_path / "bg", background=True)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{"train.epochs": 1,
                                                                      "eval.sweep": "[0.1, 0.3, 0.5]"}))
    metrics = evaluate.run(RunContext(cfg))
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
    ctx = RunContext(fast_cfg(**{"train.epochs": 1, "maps.labels": "pred", "maps.pred_threshold": 0.0,
                                 "maps.splits": "[val]"}))
    stage = maps_stage.run(ctx)
    m = load_maps(next((stage.dir / "val").glob("*.npz")))
    assert len(m["classes"]) == 4  # sigmoid > 0 holds for every class
