"""MSRC-21: dense-CRF settings for CAM pseudo masks chosen on val, then scored once on train.

    .venv/bin/python benchmarks/crf_tune.py --name calib

Coordinate search (one parameter at a time, each over a small grid, starting from the DeepLab defaults and the
temperature already chosen on val), two passes. Every setting is scored on the val split only; the best one is then
scored on train (where pseudo-mask quality is reported) next to the defaults. Reuses the run's maps (stage cache).
Writes benchmarks/out/crf-tune.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from wsss.config import load_config
from wsss.evaluation.metrics import confusion_matrix, segmentation_scores
from wsss.refine import crf_job, refine_many
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "msrc21.yaml"

GRID = {
    "temperature": [0.05, 0.1, 0.2],
    "bilateral_srgb": [5.0, 8.0, 13.0, 20.0],
    "bilateral_sxy": [40.0, 60.0, 80.0, 120.0],
    "bilateral_compat": [4.0, 7.0, 10.0, 15.0],
    "gaussian_compat": [0.0, 3.0, 6.0],
    "iterations": [5, 10],
}


def load_split(ctx: RunContext, split: str) -> list[tuple]:
    stage = run_stage(ctx, "maps")
    return [(s, m, ctx.reader.load_mask(s, m["maps"].shape[1:])) for s, m in maps_stage.iter_maps(stage, ctx, split)]


def score(ctx: RunContext, items, crf, workers: int) -> float:
    spec = ctx.spec
    jobs = ({"image": str(s.image), "maps": m["maps"], "classes": m["classes"], "spec": spec, "bg_threshold": None,
             "cfg": crf} for s, m, _ in items)
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for (_, _, gt), mask in zip(items, refine_many(crf_job, jobs, workers)):
        conf += confusion_matrix(gt, mask, spec.num_classes, spec.ignore_index)
    return segmentation_scores(conf, spec.classes)["miou"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="calib")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(CONFIG, [f"name={args.name}", "runtime.progress=false", *args.overrides])
    ctx = RunContext(cfg)
    workers = max(cfg.crf.workers, 1)
    val = load_split(ctx, ctx.split_name("val"))
    best = dataclasses.replace(cfg.crf, temperature=0.1)
    tried: dict[tuple, float] = {}

    def run(c) -> float:
        key = tuple(sorted(dataclasses.asdict(c).items()))
        if key not in tried:
            t0 = time.perf_counter()
            tried[key] = score(ctx, val, c, workers)
            print(f"val {tried[key]:.2f}  {({k: getattr(c, k) for k in GRID})}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        return tried[key]

    default_val = run(best)
    best_val = default_val
    for _ in range(args.passes):
        for key, values in GRID.items():
            for v in values:
                c = dataclasses.replace(best, **{key: v})
                m = run(c)
                if m > best_val + 1e-9:
                    best, best_val = c, m
    train = load_split(ctx, ctx.split_name("train"))
    default = dataclasses.replace(cfg.crf, temperature=0.1)
    t0 = time.perf_counter()
    out = {
        "selection_split": ctx.split_name("val"),
        "settings_tried": len(tried),
        "default": {"settings": {k: getattr(default, k) for k in GRID}, "val_miou": default_val,
                    "train_miou": score(ctx, train, default, workers)},
        "chosen": {"settings": {k: getattr(best, k) for k in GRID}, "val_miou": best_val,
                   "train_miou": score(ctx, train, best, workers)},
        "train_images_per_s_two_settings": round(2 * len(train) / (time.perf_counter() - t0), 2),
    }
    print(json.dumps(out, indent=1))
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "crf-tune.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
