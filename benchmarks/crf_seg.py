"""MSRC-21: CAM + dense CRF pseudo masks (temperature chosen on val), the segmentation network trained on them, and
the fully supervised upper bound with the same network and budget.

    .venv/bin/python benchmarks/crf_seg.py --name calib

Reuses the run's classifier and maps (stage cache). Writes benchmarks/out/crf-seg.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wsss.config import load_config
from wsss.stages import evaluate
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "msrc21.yaml"


def pseudo_miou(ctx: RunContext) -> tuple[float, float]:
    stage = run_stage(ctx, "pseudo")
    split = stage.info()["split"]
    return evaluate.score_mask_folder(ctx, stage.dir / split, split)["miou"], stage.info().get("images_per_s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="calib")
    p.add_argument("--temperatures", default="0.05,0.1,0.2,0.4")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = [f"name={args.name}", "runtime.progress=false", "maps.localizer=cam", "maps.target_layer=''",
            *args.overrides]
    out: dict = {"selection_on_val": []}
    for t in [float(x) for x in args.temperatures.split(",")]:
        ctx = RunContext(load_config(CONFIG, [*base, "pseudo.refiners=[crf]", f"crf.temperature={t}", "pseudo.split=val"]))
        miou, speed = pseudo_miou(ctx)
        out["selection_on_val"].append({"temperature": t, "val_pseudo_miou": miou, "crf_images_per_s": speed})
        print(out["selection_on_val"][-1], flush=True)
    best = max(out["selection_on_val"], key=lambda r: r["val_pseudo_miou"])["temperature"]
    out["chosen_temperature"] = best
    ctx = RunContext(load_config(CONFIG, [*base, "pseudo.refiners=[]", "seg.enabled=false"]))
    out["train_pseudo_miou_no_crf"] = pseudo_miou(ctx)[0]
    t0 = time.perf_counter()
    ctx = RunContext(load_config(CONFIG, [*base, "pseudo.refiners=[crf]", f"crf.temperature={best}"]))
    m = run_stage(ctx, "eval")
    out["weak"] = {"pseudo_train_miou": m["pseudo"]["miou"], "seg": {k: m["seg"][k] for k in (
        "split", "miou", "class_avg_acc", "pixel_acc", "train_seconds", "predict_images_per_s")},
        "seconds": round(time.perf_counter() - t0, 1)}
    print(out["weak"], flush=True)
    t0 = time.perf_counter()
    # same run: classifier, maps and pseudo stages are reused; the seg stage is retrained on ground truth
    ctx = RunContext(load_config(CONFIG, [*base, f"crf.temperature={best}", "pseudo.refiners=[crf]", "seg.masks=gt"]))
    m = run_stage(ctx, "eval")
    out["full"] = {"seg": {k: m["seg"][k] for k in ("split", "miou", "class_avg_acc", "pixel_acc", "train_seconds")},
                   "seconds": round(time.perf_counter() - t0, 1)}
    out["weak_over_full_miou"] = round(out["weak"]["seg"]["miou"] / out["full"]["seg"]["miou"], 3)
    print(out["full"], out["weak_over_full_miou"], flush=True)
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "crf-seg.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
