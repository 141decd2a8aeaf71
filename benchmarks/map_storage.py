"""Map files before and after the compact format: size per image and the maps' mIoU (the pseudo-mask rule on every
image's maps, one confusion matrix per split) with the maps as float16 (the format before 2026-11-30) and as read
back from the compact format (``maps_u8_delta``, :mod:`wsss.localize.store`).

    .venv/bin/python benchmarks/map_storage.py --config configs/msrc21.yaml name=demo [key=value ...]

Reads the maps of the run's current ``maps`` stage (made by ``wsss maps`` with the same config); writes nothing.
"""

from __future__ import annotations

import argparse
import io

import numpy as np

from wsss.config import load_config
from wsss.evaluation import confusion_matrix, segmentation_scores
from wsss.localize.store import decode_u8_delta, encode_u8_delta, load_maps
from wsss.pseudo import pseudo_mask
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline


def npz_bytes(**arrays) -> int:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.tell()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    ctx = RunContext(load_config(args.config, args.overrides))
    stage = Pipeline(ctx).stage("maps")
    if not stage.complete:
        raise SystemExit(f"the maps of this config are not complete ({stage.dir}); run `wsss maps` first")
    spec, n = ctx.spec, ctx.spec.num_classes
    print(f"maps {stage.dir}\n| split | images | float16 KB/image | compact KB/image | ratio | mIoU float16 | "
          "mIoU compact | difference |\n|---|---|---|---|---|---|---|---|")
    for role in ctx.cfg.maps.splits:
        split = ctx.split_name(role)
        conf = {"f16": np.zeros((n, n), np.int64), "u8": np.zeros((n, n), np.int64)}
        size = {"f16": 0, "u8": 0}
        samples = ctx.reader.samples(split)
        for s in samples:
            m = load_maps(stage.dir / split / f"{s.id}.npz")
            f16 = m["maps"].astype(np.float16)
            delta = encode_u8_delta(m["maps"])
            extra = {"classes": m["classes"].astype(np.int16), "scores": m["scores"]}
            size["f16"] += npz_bytes(maps=f16, **extra)
            size["u8"] += npz_bytes(maps_u8_delta=delta, **extra)
            if s.mask is None:
                continue
            gt = ctx.reader.load_mask(s, f16.shape[1:])
            for k, maps in (("f16", f16.astype(np.float32)), ("u8", decode_u8_delta(delta))):
                conf[k] += confusion_matrix(gt, pseudo_mask(maps, m["classes"], spec), n, spec.ignore_index)
        miou = {k: segmentation_scores(c, spec.classes)["miou"] for k, c in conf.items()}
        kb = {k: v / max(len(samples), 1) / 1024 for k, v in size.items()}
        print(f"| {split} | {len(samples)} | {kb['f16']:.1f} | {kb['u8']:.1f} | {kb['u8'] / max(kb['f16'], 1e-9):.2f} | "
              f"{miou['f16']} | {miou['u8']} | {round(miou['u8'] - miou['f16'], 2) if miou['f16'] is not None else '–'} |")


if __name__ == "__main__":
    main()
