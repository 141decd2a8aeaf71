"""Stage 3: pseudo masks of the training split -> ``pseudo/<split>/<id>.png`` (palette PNG, 255 = ignore).

The maps of each image go through the chain of refiners ``pseudo.refiners`` (:mod:`wsss.refine`): ``[crf]`` (dense
CRF of the maps on the original image), ``[saliency]`` (saliency-guided masks, datasets with background only),
``[saliency, crf]`` (the fused mask CRF-refined), ``[]`` (none). Maps still left at the end of the chain become a
mask by the background threshold / arg-max rule of :func:`wsss.pseudo.pseudo_mask` (with ``pseudo.ignore_below``).

For a dataset with a background class and ``pseudo.bg_threshold: null``, the threshold is chosen by a sweep on the
declared selection split (``eval.select_on``, val by default), never on the split that is reported; the choice is
recorded in the stage info and in metrics.json. The sweep scores the threshold rule on the maps as they reach the
first refiner that gives a mask (the raw maps for every registered refiner), not the chain's masks: a CRF per
image per threshold on the selection split would cost far more than the sweep, and the CRF only moves boundaries,
so the threshold that best separates object from background in the maps is a sound choice for it too. With
confident regions (``crf.confident_bg_low`` / ``crf.confident_bg_high``) the chosen threshold only matters to
``pseudo.ignore_below``; with saliency fusion it is still chosen and recorded, since the evaluate stage scores the
raw maps with it. A refiner's own threshold left null (``saliency.threshold``) is chosen the same way, by the same
:class:`~wsss.evaluation.ThresholdSweep`, on the maps as they reach that refiner.

The refiners from the first one with worker processes (``crf.workers``) on run in those workers, over images; the
ones before it run here, and this process loads the maps and writes every mask file (atomically). Speed is
recorded as ``images_per_s`` in the stage info.

Entry points for the pipeline (:mod:`wsss.stages.pipeline`): :func:`check` (before anything runs: the chain, its
refiners' settings and inputs, the selection split), :func:`compute` (the masks, given the complete maps stage) and
:func:`key_settings` (what the stage's key hashes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from wsss.config import Config, split_name
from wsss.config.typed import to_dict
from wsss.data.io import save_mask_png
from wsss.engine import shard
from wsss.errors import ConfigError
from wsss.evaluation import ThresholdSweep
from wsss.layout import MAPS
from wsss.refine import MASK, Item, Refiner, Selection, build_chain, finish_chain, refine_many, through
from wsss.runs import Stage
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


def _chooses_bg(ctx: RunContext) -> bool:
    return ctx.spec.background is not None and ctx.cfg.pseudo.bg_threshold is None


#: the background threshold where no split has masks to choose one on (your own tagged images): IRN's threshold for
#: scoring CAMs on VOC (cam_eval_thres 0.15)
DEFAULT_BG_THRESHOLD = 0.15


def _needs_selection(cfg: Config, chain: Sequence[Refiner]) -> list[str]:
    """The settings to be chosen on the selection split (for the error that says what to set instead)."""
    out = ["pseudo.bg_threshold"] if cfg.pseudo.bg_threshold is None else []
    return out + [s for r in chain if (s := r.chooses()) is not None]


def check(ctx: RunContext) -> None:
    """Raise before anything runs (the classifier may take hours): the chain (names, order, options), each refiner's
    settings and inputs (the CRF settings; the saliency source, built, and a map for every image it will need), and
    maps of the selection split where a threshold is chosen there."""
    cfg = ctx.cfg
    chain = build_chain(cfg)
    for r in chain:
        r.check(ctx)
    chosen = _needs_selection(cfg, chain)
    if not _chooses_bg(ctx):
        chosen = [s for s in chosen if s != "pseudo.bg_threshold"]
    split = ctx.split_name(cfg.eval.select_on)
    if chosen and cfg.eval.select_on not in cfg.maps.splits and split not in cfg.maps.splits:
        raise ConfigError(f"eval.select_on '{cfg.eval.select_on}' has no maps; add it to maps.splits or set "
                          f"{' and '.join(chosen)}")
    if chosen and not _has_masks(ctx, split):
        others = [c for c in chosen if c != "pseudo.bg_threshold"]
        if others:
            raise ConfigError(f"split '{split}' (eval.select_on) has no ground-truth masks to choose {' and '.join(others)} "
                              "on; set it in the config")
        log.warning("pseudo: split '%s' (eval.select_on) has no ground-truth masks to choose the background threshold "
                    "on; using %.2f (set pseudo.bg_threshold to choose another)", split, DEFAULT_BG_THRESHOLD)


def _has_masks(ctx: RunContext, split: str) -> bool:
    return any(s.mask is not None for s in ctx.reader.samples(split))


def key_settings(cfg: Config) -> list:
    """What changes the pseudo masks: the pseudo section, each refiner's :meth:`~wsss.refine.Refiner.key` (its options
    and the shared sections it reads, worker counts excluded) and, where a threshold is chosen on the selection split,
    ``eval.sweep`` and ``eval.select_on``."""
    chain = build_chain(cfg)
    pseudo = {k: v for k, v in to_dict(cfg.pseudo).items() if k != "options"}  # the refiners' keys hold them
    out: list[Any] = [pseudo, {r.name: r.key() for r in chain}]
    if _needs_selection(cfg, chain):
        # the split's name, not its role: data.val_split is in no earlier key (the maps key holds no split list)
        out.append({"sweep": list(cfg.eval.sweep), "select_on": split_name(cfg, cfg.eval.select_on)})
    return out


def _items(ctx: RunContext, maps: Stage, split: str, bg_threshold: float | None, samples=None) -> Iterator[Item]:
    spec, ignore_below = ctx.spec, ctx.cfg.pseudo.ignore_below
    for s, m in maps_stage.iter_maps(maps, ctx, split, samples):
        yield Item(s, m["maps"], m["classes"], spec, bg_threshold, ignore_below)


def _selection(ctx: RunContext, maps: Stage, before: Sequence[Refiner], bg_threshold: float | None) -> Selection:
    split = ctx.split_name(ctx.cfg.eval.select_on)

    def items() -> Iterator[tuple[Item, np.ndarray]]:
        for x in _items(ctx, maps, split, bg_threshold):
            yield through(before, x), ctx.reader.load_mask(x.sample, x.maps.shape[1:])

    return Selection(split, ctx.spec, list(ctx.cfg.eval.sweep), items)


def choose_bg_threshold(ctx: RunContext, maps: Stage, before: Sequence[Refiner] = ()) -> dict:
    """The background threshold: none without background, the configured one, or the best of a sweep of the maps as
    the refiners ``before`` give them on the selection split."""
    cfg = ctx.cfg
    if ctx.spec.background is None:
        return {"bg_threshold": None, "reason": "dataset has no background class"}
    if cfg.pseudo.bg_threshold is not None:
        return {"bg_threshold": cfg.pseudo.bg_threshold, "chosen_on": "config"}
    if not _has_masks(ctx, ctx.split_name(cfg.eval.select_on)):
        return {"bg_threshold": DEFAULT_BG_THRESHOLD, "chosen_on": "default: no ground truth on the selection split"}
    selection = _selection(ctx, maps, before, None)
    sweep = ThresholdSweep(ctx.spec, selection.thresholds)
    for x, gt in selection:
        sweep.add(x.maps, x.classes, gt)
    best = sweep.best()
    log.info("pseudo: background threshold %.2f chosen on %s (mIoU %s)", best["threshold"], selection.split,
             best["miou"])
    return {"bg_threshold": best["threshold"], "chosen_on": selection.split, "miou_on_selection_split": best["miou"]}


def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    """Write the pseudo masks of ``pseudo.split`` into ``stage.dir / <split>`` from the complete maps stage
    ``inputs["maps"]`` (and the stages the refiners declared); returns the stage info (split, images, refiners, the
    thresholds and where they were chosen, each refiner's info, speed)."""
    cfg = ctx.cfg
    maps = inputs[MAPS]
    chain = build_chain(cfg)
    for r in chain:  # with the stages each refiner declared (wsss.refine.base.Refiner.stages), complete
        r.prepare(ctx, {d.name: inputs[d.name] for d in r.stages()})
    # the maps the threshold rule would see: those the first refiner that gives a mask takes
    gives_mask = next((i for i, r in enumerate(chain) if r.output == MASK), len(chain))
    choice = choose_bg_threshold(ctx, maps, chain[:gives_mask])
    bg = choice["bg_threshold"]
    for i, r in enumerate(chain):
        if (setting := r.chooses()) is not None:
            r.choose(_selection(ctx, maps, chain[:i], bg))
            log.info("pseudo: %s chosen on %s: %s", setting, ctx.split_name(cfg.eval.select_on), r.info())

    split = ctx.split_name(cfg.pseudo.split)
    out = stage.dir / split
    # from the first refiner with workers on, the chain runs in its workers; the head runs here, lazily, so the
    # workers are fed while the main process computes (e.g. saliency) and writes
    first = next((i for i, r in enumerate(chain) if r.workers() > 0), len(chain))
    head, tail = chain[:first], tuple(chain[first:])
    workers = tail[0].workers() if tail else 0
    # under torchrun this process's share of the images (wsss.engine.shard); the thresholds above are chosen by
    # every process alike
    every = ctx.reader.samples(split)
    samples = shard.shard(every)
    jobs = ((tail, through(head, x)) for x in _items(ctx, maps, split, bg, samples))
    palette = ctx.spec.palette_bytes()
    t0 = time.perf_counter()
    n = 0
    # _items yields these samples in this same order, and refine_many keeps job order
    bar = tqdm(total=len(samples), desc=f"pseudo masks {split} ({', '.join(cfg.pseudo.refiners) or 'rule'})",
               leave=False, disable=not cfg.runtime.progress, mininterval=1.0)
    for s, mask in zip(samples, refine_many(finish_chain, jobs, workers), strict=True):
        save_mask_png(out / f"{s.id}.png", mask, palette)
        n += 1
        bar.update()
    bar.close()
    n = sum(shard.gather(n))  # every process's masks are written
    seconds = time.perf_counter() - t0
    maps_stage.verify_complete(every, out, ".png", "pseudo mask")
    log.info("pseudo: masks of %d images in %.1f s (refiners %s, %d workers)", n, seconds, list(cfg.pseudo.refiners),
             workers)
    info: dict[str, Any] = {"split": split, "images": n, "refiners": list(cfg.pseudo.refiners)}
    for r in chain:
        info.update(r.info())
    return {**info, **choice, "workers": workers, "seconds": round(seconds, 2),
            "images_per_s": round(n / max(seconds, 1e-9), 2)}


__all__ = ["check", "choose_bg_threshold", "compute", "key_settings"]
