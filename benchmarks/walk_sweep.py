"""The affinity walk's length and exponent on one split (val by default), with the run's trained affinity network:
mIoU of the walked maps (pseudo-mask rule) for each (steps, beta), optionally followed by the dense CRF, beside the
maps alone and the CRF alone. With a background class each variant's background threshold is the best of
``eval.sweep`` on the same split (the split's mIoU is then the best-threshold one, as the pseudo stage chooses it).
For choosing ``pseudo.options.<irn|psa>.steps`` / ``beta`` on val, never on train.

    .venv/bin/python benchmarks/walk_sweep.py --config configs/msrc21.yaml --refiner irn \
        --walks 8x10,32x10,32x30,64x30,256x10 --crf-after 32x60,64x30 name=demo [key=value ...]

The affinity network must be trained already (its stage complete under the config's keys: ``wsss pseudo`` with
``pseudo.refiners=[irn]``, or benchmarks/affinity.py). Writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from wsss.config import load_config
from wsss.evaluation import ThresholdSweep, confusion_matrix, segmentation_scores
from wsss.localize import load_maps
from wsss.refine import build_chain
from wsss.refine.base import Item
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline


def pairs(text: str) -> list[tuple[int, float]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        steps, _, beta = part.partition("x")
        out.append((int(steps), float(beta)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--refiner", choices=("irn", "psa"), default="irn")
    p.add_argument("--split", default="val", help="role or split name (default val)")
    p.add_argument("--walks", default="8x10,32x10,32x30,64x30,256x10", help="steps x beta, comma-separated")
    p.add_argument("--crf-after", default="", help="steps x beta followed by the dense CRF")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    base = list(args.overrides)
    ctx = RunContext(load_config(args.config, [*base, f"pseudo.refiners=[{args.refiner}, crf]"]))
    walker, crf = build_chain(ctx.cfg)
    stage = Pipeline(ctx).stage(args.refiner)
    if not stage.complete:
        raise SystemExit(f"the {args.refiner} network of this config is not trained ({stage.dir}); run "
                         f"`wsss pseudo {args.config} pseudo.refiners=[{args.refiner}] ...` first")
    walker.prepare(ctx, {args.refiner: stage})
    maps_stage = Pipeline(ctx).stage("maps")
    spec, n = ctx.spec, ctx.spec.num_classes
    split = ctx.split_name(args.split)
    walks, after = pairs(args.walks), pairs(args.crf_after)
    rows = {"maps alone": None, "crf alone": None, **{f"walk {s} steps, beta {b:g}": (s, b, False) for s, b in walks},
            **{f"walk {s} steps, beta {b:g}, then crf": (s, b, True) for s, b in after}}
    conf = {k: np.zeros((n, n), np.int64) for k in rows}
    opts = walker.options
    t0 = time.perf_counter()
    samples = [s for s in ctx.reader.samples(split) if s.mask is not None]
    settings = list(dict.fromkeys((st, b) for st, b, _ in (v for v in rows.values() if v is not None)))
    # a dataset with a background class: each variant's background threshold is the best of eval.sweep on this
    # split, on the maps as the variant's first mask-giving step sees them (as the pseudo stage chooses it), so a
    # first pass walks and sweeps, the second walks again and applies the thresholds (and the CRF, which takes the
    # threshold). Nothing is kept between images: a VOC-sized split's walked maps of every variant would not fit in
    # memory. The price is every walk twice on such datasets (the walk alone ran at 11-13 images/s on 2 cores, the
    # CRF at 17.6: RESULTS section 20); without a background class the first pass is skipped.
    background = spec.background is not None
    sweeps = {k: ThresholdSweep(spec, ctx.cfg.eval.sweep) for k in ["maps alone", *settings]} if background else {}

    def walked_images():
        for s in samples:
            m = load_maps(maps_stage.dir / split / f"{s.id}.npz")
            gt = ctx.reader.load_mask(s, m["maps"].shape[1:])
            item = Item(s, m["maps"], m["classes"], spec)
            walked = {}
            for steps, beta in settings:
                walker.options = dataclasses.replace(opts, steps=steps, beta=beta)
                walked[(steps, beta)] = walker(item)
            yield gt, item, walked

    if background:
        for gt, item, walked in walked_images():
            sweeps["maps alone"].add(item.maps, item.classes, gt)
            for key, out in walked.items():
                sweeps[key].add(out.maps, out.classes, gt)
    chosen = {k: sw.best()["threshold"] for k, sw in sweeps.items()}
    for gt, item, walked in walked_images():
        item = item.replace(bg_threshold=chosen.get("maps alone"))
        conf["maps alone"] += confusion_matrix(gt, item.final_mask(), n, spec.ignore_index)
        conf["crf alone"] += confusion_matrix(gt, crf(item).final_mask(), n, spec.ignore_index)
        for name, setting in rows.items():
            if setting is None:
                continue
            steps, beta, then_crf = setting
            out = walked[(steps, beta)].replace(bg_threshold=chosen.get((steps, beta)))
            conf[name] += confusion_matrix(gt, (crf(out) if then_crf else out).final_mask(), n, spec.ignore_index)
    if background:
        print("background thresholds chosen on this split: " + ", ".join(
            f"{k if isinstance(k, str) else f'walk {k[0]}x{k[1]:g}'} {t}" for k, t in chosen.items()))
    scores = {k: segmentation_scores(c, spec.classes)["miou"] for k, c in conf.items()}
    print(f"{args.refiner} walk on {split} ({len(samples)} images, {time.perf_counter() - t0:.0f} s); network "
          f"{stage.dir}\n| variant | mIoU |\n|---|---|")
    for k, v in scores.items():
        print(f"| {k} | {v} |")
    return scores


if __name__ == "__main__":
    main()
