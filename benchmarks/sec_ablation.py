"""MSRC-21: SEC (seed, expand, constrain) trained on CAM cues, each loss switched off in turn, next to cross-entropy on
the CAM + CRF pseudo masks with the same network and budget; and the effect of CRF post-processing of predictions.

    .venv/bin/python benchmarks/sec_ablation.py --name calib seg.train.epochs=10

Reuses the run's classifier and maps (stage cache); each variant retrains the segmentation network in the same run
directory, then predicts and scores the test split. Writes benchmarks/out/sec-ablation.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wsss.config import load_config
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "msrc21.yaml"

VARIANTS = {
    "CE on CAM+CRF pseudo masks": ["seg.loss=ce"],
    "SEC (seed + expand + constrain)": ["seg.loss=sec"],
    "SEC without seeding": ["seg.loss=sec", "seg.sec.seed=false"],
    "SEC without expansion": ["seg.loss=sec", "seg.sec.expand=false"],
    "SEC without constrain": ["seg.loss=sec", "seg.sec.constrain=false"],
}
POSTPROCESS = ("CE on CAM+CRF pseudo masks", "SEC (seed + expand + constrain)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="calib")
    p.add_argument("--only", default="", help="comma-separated variant numbers (1-based) to run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = [f"name={args.name}", "runtime.progress=false", *args.overrides]
    out_path = REPO / "benchmarks" / "out" / "sec-ablation.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    chosen = {int(i) for i in args.only.split(",") if i}
    for k, (label, extra) in enumerate(VARIANTS.items(), 1):
        if chosen and k not in chosen:
            continue
        for post in ([False, True] if label in POSTPROCESS else [False]):
            t0 = time.perf_counter()
            ctx = RunContext(load_config(CONFIG, [*base, *extra, f"seg.crf_postprocess={str(post).lower()}"]))
            m = run_stage(ctx, "eval")["seg"]
            key = label + (" + CRF post-processing" if post else "")
            rows[key] = {"overrides": [*extra, *args.overrides] + (["seg.crf_postprocess=true"] if post else []),
                         "split": m["split"], "miou": m["miou"], "class_avg_acc": m["class_avg_acc"],
                         "pixel_acc": m["pixel_acc"], "train_seconds": m.get("train_seconds"),
                         "seconds": round(time.perf_counter() - t0, 1)}
            print(key, rows[key], flush=True)
            out_path.write_text(json.dumps(rows, indent=1))
    lines = ["| variant | test mIoU | class-avg acc | pixel acc | seg training (s) |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['miou']:.1f} | {r['class_avg_acc']:.1f} | {r['pixel_acc']:.1f} | {r['train_seconds']} |")
    (out_path.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
