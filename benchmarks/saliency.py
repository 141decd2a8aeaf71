"""MSRC-21 objects (stuff classes -> background): CAM + background threshold vs saliency-guided pseudo masks.

    .venv/bin/wsss run configs/msrc21-objects.yaml name=objects          # classifier + maps (once)
    .venv/bin/python benchmarks/saliency.py --name objects [--sources spectral_residual,u2netp,u2net] \
        [--onnx model.onnx] [--folder saliency_pngs/] [k=v ...]

Needs the run's classifier and maps (train and val) to exist already: it never trains. For each kind of pseudo mask
the one threshold it has (the background score for CAM, the saliency threshold for the fusion) is chosen on val by
a sweep over ``eval.sweep``, then the masks of the **train** split are scored with it (where pseudo-mask quality is
reported). Sources: the registered ones named by ``--sources`` (default spectral_residual and frequency_tuned; u2net /
u2netp fetch their model into the saliency cache on first use); onnx with ``--onnx`` (``saliency.onnx_*``
overrides set its input size / normalisation / output mode); folder with ``--folder``. ``saliency.ignore_band`` and
``saliency.min_cam`` overrides apply to every source (ignore pixels count nowhere in the mIoU, so an ignore band
trades coverage for precision: coverage is reported). No CRF.

Also reported per source: how well saliency alone separates objects from background on train at the chosen
threshold (IoU of "salient" with the ground-truth object pixels), which says whether the source or the class
assignment limits the fused masks, and the source's speed.

Writes benchmarks/out/saliency.json and benchmarks/out/saliency.md (a Markdown table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from wsss.config import load_config
from wsss.data.io import load_image
from wsss.evaluation import ThresholdSweep, confusion_matrix, segmentation_scores
from wsss.pseudo import pseudo_mask
from wsss.pseudo.masks import best_class
from wsss.refine.saliency import check_saliency_config, fuse, fuse_best
from wsss.runs import Stage
from wsss.saliency import SALIENCY_SOURCES, build_source
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
CONFIG = REPO / "configs" / "msrc21-objects.yaml"


def load_split(ctx: RunContext, maps: Stage, split: str) -> list[tuple]:
    """(sample, maps dict, ground truth) of every image of ``split`` that has ground truth."""
    return [(s, m, ctx.reader.load_mask(s, m["maps"].shape[1:])) for s, m in maps_stage.iter_maps(maps, ctx, split)
            if s.mask is not None]


def scores(conf: np.ndarray, ctx: RunContext, labelled: int, total: int) -> dict:
    s = segmentation_scores(conf, ctx.spec.classes)
    return {"miou": s["miou"], "class_avg_acc": s["class_avg_acc"], "pixel_acc": s["pixel_acc"],
            "coverage": round(100 * labelled / max(total, 1), 2), "per_class_iou": {k: v["iou"] for k, v in
                                                                                    s["per_class"].items()}}


def score_masks(ctx: RunContext, items, make_mask) -> dict:
    n = ctx.spec.num_classes
    conf = np.zeros((n, n), np.int64)
    labelled = total = 0
    for i, (_, m, gt) in enumerate(items):
        pred = make_mask(i, m)
        conf += confusion_matrix(gt, pred, n, ctx.spec.ignore_index)
        valid = gt != ctx.spec.ignore_index
        labelled += int((valid & (pred != ctx.spec.ignore_index)).sum())
        total += int(valid.sum())
    return scores(conf, ctx, labelled, total)


def cam_baseline(ctx: RunContext, val, train) -> dict:
    sweep = ThresholdSweep(ctx.spec, ctx.cfg.eval.sweep)
    for _, m, gt in val:
        sweep.add(m["maps"], m["classes"], gt)
    best = sweep.best()
    t = best["threshold"]
    return {"threshold": t, "val_miou": best["miou"], "val_sweep": sweep.results(),
            "train": score_masks(ctx, train, lambda i, m: pseudo_mask(m["maps"], m["classes"], ctx.spec, t))}


def saliency_run(ctx: RunContext, source_cfg, source, val, train) -> dict:
    spec = ctx.spec
    band, min_cam = source_cfg.ignore_band, source_cfg.min_cam
    t0 = time.perf_counter()
    val_sal = [source(load_image(s.image), s) for s, _, _ in val]
    train_sal = [source(load_image(s.image), s) for s, _, _ in train]
    seconds = time.perf_counter() - t0  # image decoding included
    sweep = ThresholdSweep(spec, ctx.cfg.eval.sweep)
    for sal, (_, m, gt) in zip(val_sal, val):
        label, score = best_class(m["maps"], m["classes"]) if len(m["classes"]) else (None, None)
        sweep.add_masks(gt, partial(fuse_best, sal, label, score, spec, ignore_band=band, min_cam=min_cam))
    best = sweep.best()
    t = best["threshold"]
    train_scores = score_masks(ctx, train, lambda i, m: fuse(train_sal[i], m["maps"], m["classes"], spec, t, band,
                                                             min_cam))
    inter = union = 0
    for sal, (_, _, gt) in zip(train_sal, train):
        valid = gt != spec.ignore_index
        obj, salient = valid & (gt != spec.background), valid & (sal > t)
        inter += int((obj & salient).sum())
        union += int((obj | salient).sum())
    trained = getattr(SALIENCY_SOURCES.get(source_cfg.source), "pixel_supervised", True)
    return {"source": source_cfg.source, "supervision": "I+S" if trained else "I", "threshold": t,
            "val_miou": best["miou"], "val_sweep": sweep.results(),
            "train": train_scores, "train_salient_vs_object_iou": round(100 * inter / max(union, 1), 2),
            "source_images_per_s": round((len(val) + len(train)) / max(seconds, 1e-9), 2)}


def markdown(out: dict) -> str:
    rows = ["| pseudo masks (train split) | supervision | threshold (chosen on val) | val mIoU | train mIoU | "
            "train class-avg acc | coverage % | salient vs object IoU | source images/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    c = out["cam"]
    rows.append(f"| CAM + background threshold | I | bg {c['threshold']} | {c['val_miou']} | {c['train']['miou']} | "
                f"{c['train']['class_avg_acc']} | {c['train']['coverage']} | – | – |")
    for r in out["saliency"]:
        rows.append(f"| saliency ({r['source']}) + CAM class | {r['supervision']} | saliency {r['threshold']} | {r['val_miou']} | "
                    f"{r['train']['miou']} | {r['train']['class_avg_acc']} | {r['train']['coverage']} | "
                    f"{r['train_salient_vs_object_iou']} | {r['source_images_per_s']} |")
    head = (f"Run `{out['run']}`, dataset {out['dataset']}, maps `{out['maps_key']}`; thresholds chosen on "
            f"{out['selection_split']}, scored on {out['reported_split']}; ignore_band {out['ignore_band']}, "
            f"min_cam {out['min_cam']}.\n\n")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="run name whose classifier and maps exist")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--sources", default="spectral_residual,frequency_tuned",
                   help="comma-separated registered saliency sources (e.g. spectral_residual,u2netp,u2net)")
    p.add_argument("--onnx", help="an ONNX salient-object model (adds the onnx source)")
    p.add_argument("--folder", help="a folder of precomputed <id>.png saliency maps (adds the folder source)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"name={args.name}", "runtime.progress=false", *args.overrides])
    ctx = RunContext(cfg)
    check_saliency_config(cfg.saliency, ctx.spec)
    maps = Pipeline(ctx).stage("maps")
    if not maps.complete:
        sys.exit(f"no complete maps for run '{args.name}' with this config under {maps.dir} (key {maps.key}); "
                 f"run `wsss run {args.config} name={args.name}` first (this benchmark never trains)")
    val_split, train_split = ctx.split_name(cfg.eval.select_on), ctx.split_name("train")
    val, train = load_split(ctx, maps, val_split), load_split(ctx, maps, train_split)
    sources = [dataclasses.replace(cfg.saliency, source=n.strip()) for n in args.sources.split(",") if n.strip()]
    if args.onnx:
        sources.append(dataclasses.replace(cfg.saliency, source="onnx", onnx_path=args.onnx))
    if args.folder:
        sources.append(dataclasses.replace(cfg.saliency, source="folder", folder=args.folder))
    built = [build_source(sc) for sc in sources]
    for source in built:  # every source's problems (a missing map, a model that does not fit) before any work
        source.check([s for s, _, _ in val + train])
    out = {"run": args.name, "dataset": ctx.spec.name, "maps_key": maps.key, "selection_split": val_split,
           "reported_split": train_split, "images": {val_split: len(val), train_split: len(train)},
           "ignore_band": cfg.saliency.ignore_band, "min_cam": cfg.saliency.min_cam, "seed": cfg.seed,
           "cam": cam_baseline(ctx, val, train), "saliency": []}
    print(f"CAM: bg {out['cam']['threshold']} -> train mIoU {out['cam']['train']['miou']}", flush=True)
    for sc, source in zip(sources, built):
        r = saliency_run(ctx, sc, source, val, train)
        out["saliency"].append(r)
        print(f"saliency {sc.source}: threshold {r['threshold']} -> train mIoU {r['train']['miou']}", flush=True)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "saliency.json").write_text(json.dumps(out, indent=1) + "\n")
    (dest / "saliency.md").write_text(markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
