"""SEAM on MSRC-21 with its parts switched off in turn, at the method comparison's budget, next to the CAM baseline.

    .venv/bin/python benchmarks/seam_ablation.py --seeds 0,1 train.epochs=5 train.crop_size=256 "maps.splits=[train,test]"

Every variant is an ordinary ``wsss bench methods`` run of the ``seam`` method (its own run directory, same config,
budget and seeds as the comparison table), so the full SEAM and CAM rows reuse the comparison's runs when their
settings match (``--prefix`` of that comparison, default ``bench-msrc21``). SEAM takes ``background`` from the dataset
now; the explicit ``background=false`` (MSRC-21 has no background class) only keeps the stage keys of the
comparison's runs, which were made with it. Writes benchmarks/out/seam-ablation.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsss.bench.methods import COLUMNS, bench_methods, format_stat

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "msrc21.yaml"
BG = "method.options.background=false"

#: label -> (prefix suffix, seam options); "" = the comparison's own prefix (its SEAM runs are reused)
VARIANTS = {
    "SEAM: ER + PCM + ECR (default)": ("", []),
    "without ER (PCM + ECR)": ("noer", ["method.options.er_weight=0"]),
    "without PCM and ECR (CAM + ER)": ("nopcm", ["method.options.pcm=false", "method.options.ecr_weight=0"]),
    "siamese classification only (no ER, PCM, ECR)": (
        "siamese", ["method.options.pcm=false", "method.options.ecr_weight=0", "method.options.er_weight=0"]),
    "full SEAM, transformed branch at 0.5x (official 0.3x)": ("scale05", ["method.options.scale=0.5"]),
}
KEYS = ("cls_map_test", "map_miou_train", "pseudo_miou_train", "map_miou_test", "epoch_seconds")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--prefix", default="bench-msrc21", help="prefix of the comparison whose cam/seam runs to reuse")
    p.add_argument("overrides", nargs="*", help="the comparison's shared overrides (budget)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = REPO / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    base = bench_methods(CONFIG, ["cam"], seeds, args.overrides, prefix=args.prefix,
                         out=out_dir / "seam-ablation-runs" / "cam")
    rows.append(("CAM baseline", base["rows"][0]))
    for label, (suffix, options) in VARIANTS.items():
        prefix = f"{args.prefix}-seamabl-{suffix}" if suffix else args.prefix
        res = bench_methods(CONFIG, ["seam"], seeds, args.overrides, {"seam": [BG, *options]}, prefix=prefix,
                            out=out_dir / "seam-ablation-runs" / (suffix or "full"))
        rows.append((label, res["rows"][0]))

    headers = {c.key: c.header for c in COLUMNS}
    lines = ["| variant | status | " + " | ".join(headers[k] for k in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for label, row in rows:
        lines.append(f"| {label} | {row['status']} | " + " | ".join(format_stat(row["columns"][k]) for k in KEYS) + " |")
    table = "\n".join(lines)
    (out_dir / "seam-ablation.md").write_text(
        f"SEAM ablation, configs/msrc21.yaml {' '.join(args.overrides)}, seeds {args.seeds}\n\n{table}\n")
    (out_dir / "seam-ablation.json").write_text(json.dumps(
        {"config": str(CONFIG), "overrides": args.overrides, "seeds": seeds,
         "rows": [{"variant": label, **row} for label, row in rows]}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
