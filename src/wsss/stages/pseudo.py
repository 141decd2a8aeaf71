"""Stage 3: pseudo masks of the training split -> ``pseudo/<split>/<id>.png`` (palette PNG, 255 = ignore).

For a dataset with a background class and ``pseudo.bg_threshold: null``, the threshold is chosen by a sweep on the
declared selection split (``eval.select_on``, val by default), never on the split that is reported; the choice is
recorded in the stage info and in metrics.json.
"""

from __future__ import annotations

import logging

from wsss.data.io import save_mask_png
from wsss.errors import ConfigError
from wsss.evaluation import ThresholdSweep
from wsss.pseudo import pseudo_mask
from wsss.runs import Stage
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


def choose_bg_threshold(ctx: RunContext, maps: Stage) -> dict:
    cfg = ctx.cfg
    if ctx.spec.background is None:
        return {"bg_threshold": None, "reason": "dataset has no background class"}
    if cfg.pseudo.bg_threshold is not None:
        return {"bg_threshold": cfg.pseudo.bg_threshold, "chosen_on": "config"}
    split = ctx.split_name(cfg.eval.select_on)
    if cfg.eval.select_on not in cfg.maps.splits and split not in cfg.maps.splits:
        raise ConfigError(f"eval.select_on '{cfg.eval.select_on}' has no maps; add it to maps.splits or set "
                          "pseudo.bg_threshold")
    sweep = ThresholdSweep(ctx.spec, cfg.eval.sweep)
    for s, m in maps_stage.iter_maps(maps, ctx, split):
        sweep.add(m["maps"], m["classes"], ctx.reader.load_mask(s, m["maps"].shape[1:]))
    best = sweep.best()
    log.info("pseudo: background threshold %.2f chosen on %s (mIoU %s)", best["threshold"], split, best["miou"])
    return {"bg_threshold": best["threshold"], "chosen_on": split, "miou_on_selection_split": best["miou"]}


def run(ctx: RunContext) -> Stage:
    maps = maps_stage.run(ctx)
    stage = Stage(ctx.run_dir, "pseudo", ctx.pseudo_key())
    if stage.complete:
        log.info("pseudo: reusing %s (config unchanged)", stage.dir)
        return stage
    stage.open()
    choice = choose_bg_threshold(ctx, maps)
    split = ctx.split_name(ctx.cfg.pseudo.split)
    out = stage.dir / split
    palette = ctx.spec.palette_bytes()
    n = 0
    for s, m in maps_stage.iter_maps(maps, ctx, split):
        mask = pseudo_mask(m["maps"], m["classes"], ctx.spec, choice["bg_threshold"], ctx.cfg.pseudo.ignore_below)
        save_mask_png(out / f"{s.id}.png", mask, palette)
        n += 1
    stage.finish(split=split, images=n, **choice)
    return stage
