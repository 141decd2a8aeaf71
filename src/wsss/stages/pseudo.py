"""Stage 3: pseudo masks of the training split -> ``pseudo/<split>/<id>.png`` (palette PNG, 255 = ignore).

For a dataset with a background class and ``pseudo.bg_threshold: null``, the threshold is chosen by a sweep on the
declared selection split (``eval.select_on``, val by default), never on the split that is reported; the choice is
recorded in the stage info and in metrics.json.

With ``crf.enabled`` the masks are dense-CRF refinements of the maps on the original images
(:func:`wsss.refine.crf_pseudo_mask`), computed in ``crf.workers`` processes over images; this process loads the
maps and writes every mask file (atomically). The background threshold is still the one chosen by the sweep over
the *raw* maps (:func:`choose_bg_threshold`), not one swept over CRF masks: a CRF per image per threshold on the
selection split would cost far more than the sweep, and the CRF only moves boundaries, so the threshold that best
separates object from background in the maps is a sound choice for it too. With confident regions
(``crf.confident_bg_low`` / ``crf.confident_bg_high``) the chosen threshold only matters to ``pseudo.ignore_below``.
Speed is recorded as ``crf_images_per_s`` in the stage info.

With ``pseudo.method: saliency`` (datasets with background only) the masks are saliency-guided
(:mod:`wsss.saliency`): a saliency map decides object extent, the maps decide the class. Its threshold
(``saliency.threshold: null``) is chosen by a sweep on the selection split like the background threshold; with
``crf.enabled`` the fused mask is CRF-refined. The source is built and checked (e.g. every precomputed map of the
splits exists) before the classifier and the maps. The background threshold is still chosen and recorded: the
evaluate stage scores the raw maps with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wsss.data.io import save_mask_png
from wsss.errors import ConfigError
from wsss.evaluation import ThresholdSweep
from wsss.pseudo import pseudo_mask
from wsss.refine import check_crf_config, crf_job, refine_many
from wsss.runs import Stage
from wsss.saliency import (
    SaliencySource,
    SaliencySweep,
    build_source,
    check_saliency_config,
    fuse,
    fused_crf_job,
    fused_mask_job,
    image_and_saliency,
)
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


def _write_crf_masks(ctx: RunContext, maps: Stage, split: str, out: Path, bg_threshold: float | None) -> dict:
    """CRF pseudo masks of ``split`` computed in worker processes, written here (atomically) in split order."""
    crf = ctx.cfg.crf
    if crf.confident_bg_low is not None and ctx.spec.background is None:
        log.warning("pseudo: crf.confident_bg_low/high apply to datasets with a background class only; ignored")
    samples = ctx.reader.samples(split)
    jobs = ({"image": str(s.image), "maps": m["maps"], "classes": m["classes"], "spec": ctx.spec,
             "bg_threshold": bg_threshold, "cfg": crf, "ignore_below": ctx.cfg.pseudo.ignore_below}
            for s, m in maps_stage.iter_maps(maps, ctx, split))
    palette = ctx.spec.palette_bytes()
    t0 = time.perf_counter()
    n = 0
    # iter_maps yields the split's samples in this same order, and refine_many keeps job order
    for s, mask in zip(samples, refine_many(crf_job, jobs, crf.workers), strict=True):
        save_mask_png(out / f"{s.id}.png", mask, palette)
        n += 1
    seconds = time.perf_counter() - t0
    log.info("pseudo: CRF masks of %d images in %.1f s (%d workers)", n, seconds, crf.workers)
    return {"images": n, "crf_images_per_s": round(n / max(seconds, 1e-9), 2), "crf_seconds": round(seconds, 2),
            "crf_workers": crf.workers}


def prepare_saliency(ctx: RunContext) -> SaliencySource:
    """Check the saliency settings and build the source; every image that will need a map is checked now."""
    cfg = ctx.cfg
    check_saliency_config(cfg.saliency, ctx.spec)
    source = build_source(cfg.saliency)
    roles = [cfg.pseudo.split] + ([cfg.eval.select_on] if cfg.saliency.threshold is None else [])
    source.check([s for split in dict.fromkeys(map(ctx.split_name, roles)) for s in ctx.reader.samples(split)])
    return source


def choose_saliency_threshold(ctx: RunContext, maps: Stage, source: SaliencySource) -> dict:
    cfg, sal = ctx.cfg, ctx.cfg.saliency
    if sal.threshold is not None:
        return {"saliency_threshold": sal.threshold, "saliency_chosen_on": "config"}
    split = ctx.split_name(cfg.eval.select_on)
    if cfg.eval.select_on not in cfg.maps.splits and split not in cfg.maps.splits:
        raise ConfigError(f"eval.select_on '{cfg.eval.select_on}' has no maps; add it to maps.splits or set "
                          "saliency.threshold")
    sweep = SaliencySweep(ctx.spec, cfg.eval.sweep, sal.ignore_band, sal.min_cam)
    for s, m in maps_stage.iter_maps(maps, ctx, split):
        _, saliency = image_and_saliency(source, s, m["maps"].shape[1:])
        sweep.add(saliency, m["maps"], m["classes"], ctx.reader.load_mask(s, m["maps"].shape[1:]))
    best = sweep.best()
    log.info("pseudo: saliency threshold %.2f chosen on %s (mIoU %s)", best["threshold"], split, best["miou"])
    return {"saliency_threshold": best["threshold"], "saliency_chosen_on": split,
            "saliency_miou_on_selection_split": best["miou"]}


def _write_saliency_masks(ctx: RunContext, maps: Stage, split: str, out: Path, source: SaliencySource,
                          threshold: float) -> dict:
    """Saliency-guided masks of ``split``; saliency and fusion here, the CRF (if enabled) in worker processes."""
    sal, crf = ctx.cfg.saliency, ctx.cfg.crf
    if crf.enabled and crf.confident_bg_low is not None:
        log.warning("pseudo: crf.confident_bg_low/high do not apply to saliency-guided masks; ignored")

    def jobs():
        for s, m in maps_stage.iter_maps(maps, ctx, split):
            image, saliency = image_and_saliency(source, s, m["maps"].shape[1:])
            mask = fuse(saliency, m["maps"], m["classes"], ctx.spec, threshold, sal.ignore_band, sal.min_cam)
            yield {"image": image, "mask": mask, "classes": m["classes"], "zero": saliency <= 0, "spec": ctx.spec,
                   "cfg": crf, "gt_prob": sal.crf_gt_prob}

    fn, workers = (fused_crf_job, crf.workers) if crf.enabled else (fused_mask_job, 0)
    palette = ctx.spec.palette_bytes()
    t0 = time.perf_counter()
    n = 0
    for s, mask in zip(ctx.reader.samples(split), refine_many(fn, jobs(), workers), strict=True):
        save_mask_png(out / f"{s.id}.png", mask, palette)
        n += 1
    seconds = time.perf_counter() - t0
    return {"images": n, "saliency_source": sal.source, "saliency_crf": crf.enabled,
            "saliency_images_per_s": round(n / max(seconds, 1e-9), 2)}


def run(ctx: RunContext) -> Stage:
    if ctx.cfg.crf.enabled:
        check_crf_config(ctx.cfg.crf)  # before the classifier and the maps, which may take hours
    source = prepare_saliency(ctx) if ctx.cfg.pseudo.method == "saliency" else None
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
    if source is not None:
        sal_choice = choose_saliency_threshold(ctx, maps, source)
        info = _write_saliency_masks(ctx, maps, split, out, source, sal_choice["saliency_threshold"])
        stage.finish(split=split, method="saliency", **info, **sal_choice, **choice)
        return stage
    if ctx.cfg.crf.enabled:
        stage.finish(split=split, **_write_crf_masks(ctx, maps, split, out, choice["bg_threshold"]), **choice)
        return stage
    n = 0
    for s, m in maps_stage.iter_maps(maps, ctx, split):
        mask = pseudo_mask(m["maps"], m["classes"], ctx.spec, choice["bg_threshold"], ctx.cfg.pseudo.ignore_below)
        save_mask_png(out / f"{s.id}.png", mask, palette)
        n += 1
    stage.finish(split=split, images=n, **choice)
    return stage
