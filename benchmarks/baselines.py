"""The label check and the trivial baselines of a dataset, from its labels and masks alone (no training).

    .venv/bin/python benchmarks/baselines.py [--config configs/msrc21.yaml] [key=value ...]

Runs exactly what ``wsss run`` runs before training (the label check of the training split, with the config's
``label_check`` thresholds) and in evaluation (the trivial baselines of wsss.evaluation.baselines on the config's map
splits), without writing into any run directory. Prints both as Markdown tables (per class: share of training
images labelled with it, share of the training pixels; per split: mIoU / class-average / pixel accuracy of each
baseline) and writes them to benchmarks/out/baselines-<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from wsss.config import load_config
from wsss.evaluation.baselines import LABELS
from wsss.stages.context import RunContext
from wsss.stages.evaluate import trivial_baselines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/msrc21.yaml")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. data.to_background=[building,grass,tree,sky,water,road]")
    args = ap.parse_args(argv)
    ctx = RunContext(load_config(args.config, args.overrides))
    t0 = time.perf_counter()
    check = ctx.label_check
    t_check = time.perf_counter() - t0
    splits = [ctx.split_name(r) for r in ctx.cfg.maps.splits]
    t0 = time.perf_counter()
    baselines = trivial_baselines(ctx.reader, ctx.split_name("train"), splits)
    t_base = time.perf_counter() - t0

    print(f"## {ctx.spec.name}: label check of split {check['split']} ({check['images']} images, "
          f"{check['masks']} masks; {t_check:.1f} s): {check['verdict']}\n")
    print("| class | training images (%) | training pixels (%) |\n|---|---|---|")
    for name, v in sorted(check["classes"].items(), key=lambda kv: -(kv[1]["images"] or 101)):
        print(f"| {name} | {'–' if v['images'] is None else v['images']} | {v['pixels']} |")
    if check["message"]:
        print(f"\n{check['message']}")
    if baselines:
        print(f"\n## trivial baselines ({t_base:.1f} s; statistics of split {baselines['training']['split']}, most "
              f"frequent class {baselines['training']['most_frequent']})\n")
        print("| baseline | " + " | ".join(f"{s} mIoU / class-avg / pixel acc" for s in baselines["splits"]) + " |")
        print("|---|" + "---|" * len(baselines["splits"]))
        for name in LABELS:
            cells = [baselines["splits"][s].get(name) for s in baselines["splits"]]
            if any(cells):
                print(f"| {LABELS[name]} | " + " | ".join(f"{c['miou']} / {c['class_avg_acc']} / {c['pixel_acc']}"
                                                     for c in cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"baselines-{ctx.spec.name}.json"
    path.write_text(json.dumps({"label_check": check, "baselines": baselines,
                                "seconds": {"label_check": round(t_check, 2), "baselines": round(t_base, 2)}}, indent=1))
    print(f"\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
