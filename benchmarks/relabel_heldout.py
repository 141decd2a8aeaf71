"""Can the segmentation network relabel better than the pseudo masks it learned from? Asked where the answer is
honest: on a split the network never trained on (val by default).

Self-training (``self_train.rounds`` > 1) relabels the *training* images, which the network has fitted, so its
predictions there mostly repeat its training masks. On held-out images its label-restricted prediction is what a
relabelling would be worth if the network did not remember the image (a k-fold relabelling, for instance). This
script scores, on ``--split`` of a finished run (ground truth needed):

- ``maps + CRF``: the classifier's maps through the dense CRF (``crf.*``), the pseudo-mask rule of the default chain;
- ``network``: round 1's network, softmax over ``self_train.scales`` and mirrors, restricted to the image's labels
  (what ``relabel_r2`` computes);
- mixtures ``w * maps + (1 - w) * network`` of the two probability maps, without and with the CRF (``w`` = 1 is the
  maps alone, 0 the network alone): whether the two sources together beat either.

    .venv/bin/python benchmarks/relabel_heldout.py --config configs/msrc21.yaml name=demo [key=value ...] \
        [--split val] [--weights 0 0.25 0.5 0.75 1] [--save-masks W DIR]

``--split train`` (the split the network trained on) asks what a relabelling of the training images would give as
next-round masks: the network's fit of its own masks is in it, so it does not say what the network is worth as a
labeller. ``--save-masks W DIR`` writes the masks of ``w = W`` + CRF as palette PNGs ``DIR/<id>.png`` (to train a
network on them, benchmarks/RESULTS.md section 24).

The config and overrides name the run's variants as ``wsss run`` does (the same keys): its segmentation network
(round 1) and maps must be complete, with maps of the split (``maps.splits``; the default configs compute train, val
and test). Writes nothing but ``--out`` and ``--save-masks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from wsss.config import load_config
from wsss.data.io import load_image, save_mask_png
from wsss.evaluation import confusion_matrix, segmentation_scores
from wsss.localize.store import load_maps
from wsss.refine import dense_crf
from wsss.refine.crf import maps_to_probs
from wsss.runs import Stage
from wsss.stages import seg as seg_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline
from wsss.stages.self_train import allowed_classes, restrict


def complete(pipeline: Pipeline, name: str, config: str) -> Stage:
    stage = pipeline.stage(name)
    if not stage.complete:
        sys.exit(f"the stage '{name}' of this config is not complete ({stage.dir}); run `wsss run {config} ...` with "
                 "the same overrides first")
    return stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", default="val",
                    help="default val, a split the network did not train on (train: what a relabelling would give)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="weights w of the maps in w * maps + (1 - w) * network")
    ap.add_argument("--out", type=Path, help="write the scores as JSON here")
    ap.add_argument("--save-masks", nargs=2, metavar=("W", "DIR"),
                    help="write the masks of w = W (one of --weights), + dense CRF, into DIR")
    ap.add_argument("overrides", nargs="*", help="key=value settings of the run, as given to `wsss run`")
    args = ap.parse_args()

    cfg = load_config(args.config, [*args.overrides, "runtime.progress=false"])
    ctx = RunContext(cfg)
    pipeline = Pipeline(ctx)
    spec = ctx.spec
    split = ctx.split_name(args.split)
    train = ctx.split_name(cfg.pseudo.split)
    if split == train:
        print(f"--split {split}: the network trained on these images; the scores say what a relabelling would give as "
              "masks, not what the network is worth as a labeller")
    save_w, save_dir = (float(args.save_masks[0]), Path(args.save_masks[1])) if args.save_masks else (None, None)
    if save_w is not None and save_w not in args.weights:
        sys.exit(f"--save-masks {save_w}: not one of --weights {args.weights}")
    seg = complete(pipeline, "seg", args.config)
    maps = complete(pipeline, "maps", args.config)
    bg = None
    if spec.background is not None:
        bg = complete(pipeline, "pseudo", args.config).info().get("bg_threshold")
        if bg is None:
            sys.exit("the run's pseudo stage recorded no background threshold")
    model, device = seg_stage.segmenter_on_device(ctx, seg)
    samples = [s for s in ctx.reader.samples(split) if s.mask is not None]
    if not samples:
        sys.exit(f"split '{split}' has no ground-truth masks")
    n = spec.num_classes
    conf = {(w, crf): np.zeros((n, n), np.int64) for w in args.weights for crf in (False, True)}
    st = cfg.self_train
    palette = spec.palette_bytes()
    t0 = time.perf_counter()
    for batch, probs in seg_stage.predict_batches(ctx, model, device, samples, range(len(samples)), st.scales, st.flip,
                                                  f"network on {split}"):
        for b, i in enumerate(batch["index"]):
            s = samples[int(i)]
            net = restrict(probs[b], allowed_classes(s.labels or (), spec))
            if net is None:
                continue
            m = load_maps(maps.dir / split / f"{s.id}.npz")
            cam = np.zeros_like(net)
            if len(m["classes"]):
                p, labels = maps_to_probs(m["maps"], m["classes"], spec, bg, cfg.crf.temperature)
                cam[labels] = p
            image = load_image(s.image)
            gt = ctx.reader.load_mask(s, net.shape[1:])
            for w in args.weights:
                mix = (w * cam + (1 - w) * net).astype(np.float32)
                conf[(w, False)] += confusion_matrix(gt, mix.argmax(0).astype(np.uint8), n, spec.ignore_index)
                refined = dense_crf(image, mix, cfg.crf).argmax(0).astype(np.uint8)
                if w == save_w:
                    save_mask_png(save_dir / f"{s.id}.png", refined, palette)
                conf[(w, True)] += confusion_matrix(gt, refined, n, spec.ignore_index)
    rows = []
    for (w, crf), cm in conf.items():
        scores = segmentation_scores(cm, spec.classes)
        rows.append({"maps_weight": w, "crf": crf, "miou": scores["miou"],
                     "per_class_iou": {c: v["iou"] for c, v in scores["per_class"].items()}})
    print(f"{ctx.run_dir} on {split} ({len(samples)} images, {time.perf_counter() - t0:.0f} s); round 1's network "
          f"{seg.dir.name}, maps {maps.dir.name}")
    print("| maps weight w | w * maps + (1 - w) * network | + dense CRF |")
    print("|---|---|---|")
    for w in args.weights:
        raw = next(r for r in rows if r["maps_weight"] == w and not r["crf"])
        ref = next(r for r in rows if r["maps_weight"] == w and r["crf"])
        what = {0.0: " (network alone)", 1.0: " (maps alone)"}.get(w, "")
        print(f"| {w}{what} | {raw['miou']} | {ref['miou']} |")
    if args.out:
        args.out.write_text(json.dumps({"split": split, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
