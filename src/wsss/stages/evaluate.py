"""Stage 4: score everything against ground truth -> ``metrics.json``.

Per split with maps: classifier mAP (from the scores stored with the maps), a threshold sweep, and the maps turned
into masks by the same rule as the pseudo masks (with the threshold chosen on the selection split). For the pseudo
split, the written pseudo masks themselves. Each split is one confusion matrix; each map file is read once.

Beside them, on every scored split, the trivial baselines of :mod:`wsss.evaluation.baselines` (the most frequent
class everywhere, image labels + class frequency, and the spatial prior of the training masks as a reference):
``metrics["baselines"]``; :func:`summary_lines` prints the best one beside each score and says when a score is
below it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsss.config import config_hash
from wsss.data.datasets import label_vector
from wsss.evaluation import ThresholdSweep, average_precision, confusion_matrix, segmentation_scores
from wsss.evaluation.baselines import DESCRIPTIONS, LABELS, TRIVIAL, BaselineScorer, training_stats
from wsss.layout import MAPS, PRED, PSEUDO, SEG
from wsss.pseudo import pseudo_mask
from wsss.runs import Stage, atomic_write_json
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


def _score_split(ctx: RunContext, maps, split: str, bg_threshold) -> dict:
    spec = ctx.spec
    sweep = ThresholdSweep(spec, ctx.cfg.eval.sweep)
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    scores, targets = [], []
    has_gt = True
    n = len(ctx.reader.samples(split))
    for s, m in tqdm(maps_stage.iter_maps(maps, ctx, split), total=n, desc=f"score maps {split}", leave=False,
                     disable=not ctx.cfg.runtime.progress, mininterval=1.0):
        scores.append(m["scores"])
        targets.append(label_vector(s.labels or (), spec).numpy())
        if s.mask is None:
            has_gt = False
            continue
        gt = ctx.reader.load_mask(s, m["maps"].shape[1:])
        sweep.add(m["maps"], m["classes"], gt)
        pred = pseudo_mask(m["maps"], m["classes"], spec, bg_threshold)
        conf += confusion_matrix(gt, pred, spec.num_classes, spec.ignore_index)
    ap = average_precision(np.stack(scores), np.stack(targets))
    out = {
        "images": len(scores),
        "classifier": {
            "mAP": None if np.all(np.isnan(ap)) else round(float(np.nanmean(ap)) * 100, 2),
            "ap": {n: (None if np.isnan(v) else round(float(v) * 100, 2)) for n, v in zip(spec.fg_names, ap)},
        },
    }
    if has_gt:
        out["maps"] = segmentation_scores(conf, spec.classes)
        out["sweep"] = sweep.results()
    return out


def score_mask_folder(ctx: RunContext, folder, split: str) -> dict:
    """Scores of a folder of mask PNGs (pseudo masks, predictions) against the ground truth of a split: one confusion
    matrix over the images that have ground truth."""
    conf = np.zeros((ctx.spec.num_classes,) * 2, np.int64)
    for s in ctx.reader.samples(split):
        if s.mask is None:
            continue
        pred = np.asarray(Image.open(folder / f"{s.id}.png"))
        conf += confusion_matrix(ctx.reader.load_mask(s, pred.shape), pred, ctx.spec.num_classes, ctx.spec.ignore_index)
    return segmentation_scores(conf, ctx.spec.classes)


def _score_predictions(ctx: RunContext, pred: Stage, seg: Stage) -> dict:
    """The segmentation network alone on ``seg.predict_split`` (never trained on)."""
    info = pred.info()
    split = info["split"]
    return {"split": split, "masks": ctx.cfg.seg.masks, "backbone": f"DeepLabV3/{ctx.cfg.seg.model.backbone}",
            **score_mask_folder(ctx, pred.dir / split, split),
            "predict_images_per_s": info.get("images_per_s"), "train_seconds": seg.info().get("train_seconds")}


def _with_masks(reader, samples) -> Iterator[tuple]:
    """(sample, mask or None) in order, masks decoded by a few threads a chunk at a time (bounded memory)."""
    chunk = 64
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i in range(0, len(samples), chunk):
            part = samples[i: i + chunk]
            yield from zip(part, pool.map(lambda s: reader.load_mask(s) if s.mask is not None else None, part))


def trivial_baselines(reader, train_split: str, splits: Sequence[str]) -> dict | None:
    """The trivial baselines (:mod:`wsss.evaluation.baselines`) on each of ``splits`` that has masks: the training
    split's statistics once, then one pass over each split's masks. None when no split has masks."""
    spec = reader.spec
    splits = [s for s in dict.fromkeys(splits) if any(x.mask is not None for x in reader.samples(s))]
    if not splits:
        return None
    train = reader.samples(train_split)
    stats = training_stats(((m, s.labels or ()) for s, m in _with_masks(reader, train)), spec.num_classes,
                           spec.ignore_index, spec.background)
    out: dict = {"training": {"split": train_split, **stats.summary(spec.classes)},
                 "about": dict(DESCRIPTIONS), "trivial": list(TRIVIAL), "splits": {}}
    for split in splits:
        scorer = BaselineScorer(stats, spec.num_classes, spec.ignore_index, spec.background)
        for s, gt in _with_masks(reader, [x for x in reader.samples(split) if x.mask is not None]):
            scorer.add(gt, s.labels or ())
        out["splits"][split] = scorer.scores(spec.classes)
    return out


#: what a figure was learned from, as the WSSS literature labels it
SUPERVISION = {
    "I": "image-level labels",
    "I+S": "image-level labels + a saliency network trained with pixel-level masks of salient objects (e.g. DUTS)",
    "F": "pixel-level masks (full supervision)",
}


def supervision_of(cfg) -> dict:
    """The supervision behind the maps, the pseudo masks and the segmentation network of a run: ``I`` (image labels),
    ``I+S`` (and a saliency network trained with pixel masks: a saliency source whose class does not set
    ``pixel_supervised = False``, read by the ``saliency`` refiner -- the pseudo masks on -- or by a method whose class
    sets ``uses_saliency`` -- the maps on) or ``F`` (``seg.masks=gt``)."""
    from wsss.methods import METHODS
    from wsss.saliency import SALIENCY_SOURCES

    method_reads = getattr(METHODS.get(cfg.method.name), "uses_saliency", False)
    saliency = None
    if "saliency" in cfg.pseudo.refiners or method_reads:
        source = SALIENCY_SOURCES.get(cfg.saliency.source)
        if getattr(source, "pixel_supervised", True):
            saliency = cfg.saliency.source
    maps = "I+S" if method_reads and saliency else "I"
    pseudo = "I+S" if maps == "I+S" or saliency else "I"
    seg = "F" if cfg.seg.masks == "gt" else pseudo
    out = {"maps": maps, "pseudo": pseudo, "seg": seg, "about": {k: SUPERVISION[k] for k in {maps, pseudo, seg}}}
    if saliency:
        out["saliency_source"] = saliency
    return out


def inputs(cfg) -> tuple[str, ...]:
    return (MAPS, PSEUDO, SEG, PRED) if cfg.seg.enabled else (MAPS, PSEUDO)


def compute(ctx: RunContext, inputs: dict, stage=None) -> dict:
    """``inputs``: every stage of the run so far (an uncached stage gets them all), whose records (keys, timings)
    go into metrics.json beside the scores."""
    metrics = metrics_of(ctx, inputs)
    write_metrics(ctx, metrics)
    return metrics


def write_metrics(ctx: RunContext, metrics: dict) -> None:
    """``metrics.json`` (the latest) and ``metrics/<key>.json``, keyed by the stage variants it scored, so that the
    scores of every variant a run holds stay readable after other settings were run."""
    key = config_hash("eval", metrics.get("stage_keys") or {})
    metrics["metrics_key"] = key
    atomic_write_json(ctx.layout.metrics_variant(key), metrics)
    atomic_write_json(ctx.layout.metrics, metrics)


def metrics_of(ctx: RunContext, inputs: dict, network: str = SEG) -> dict:
    """The scores of the run's stages ``inputs`` (``compute`` writes them); ``inputs[network]`` is the segmentation
    network whose predictions ``inputs[PRED]`` are (a later round's with self-training)."""
    t0 = time.perf_counter()
    pseudo, maps = inputs[PSEUDO], inputs[MAPS]
    info = pseudo.info()
    bg = info.get("bg_threshold")
    cfg = ctx.cfg
    records = {n: s.info() for n, s in inputs.items() if isinstance(s, Stage)}
    metrics: dict = {
        "run": cfg.name,
        "dataset": ctx.spec.name,
        "method": cfg.method.name,
        "backbone": f"{cfg.model.backbone} OS{cfg.model.output_stride}",
        "localizer": cfg.maps.localizer,
        "seed": cfg.seed,
        "image_labels": cfg.maps.labels,
        "supervision": supervision_of(cfg),
        "selection": {k: info.get(k) for k in ("bg_threshold", "chosen_on", "reason", "miou_on_selection_split",
                                               "saliency_threshold", "saliency_chosen_on",
                                               "saliency_miou_on_selection_split")
                      if info.get(k) is not None},
        "stage_keys": {n: r.get("key") for n, r in records.items()},
        "splits": {},
    }
    for role in cfg.maps.splits:
        split = ctx.split_name(role)
        metrics["splits"][split] = _score_split(ctx, maps, split, bg)
    # the pseudo masks as written (ignore band included)
    split = info["split"]
    if any(s.mask is not None for s in ctx.reader.samples(split)):
        metrics["pseudo"] = {"split": split, **score_mask_folder(ctx, pseudo.dir / split, split)}
    metrics["timing"] = {
        "maps": maps.info().get("splits"),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
    if SEG in inputs:
        if any(s.mask is not None for s in ctx.reader.samples(inputs[PRED].info()["split"])):
            metrics["seg"] = _score_predictions(ctx, inputs[PRED], inputs[network])
    scored = [*metrics["splits"], split, *([inputs[PRED].info()["split"]] if SEG in inputs else [])]
    unscored = [name for name in dict.fromkeys(scored)
                if not any(s.mask is not None for s in ctx.reader.samples(name))]
    if unscored:
        metrics["not_scored"] = {"splits": unscored, "reason": "no ground-truth masks"}
    t1 = time.perf_counter()
    baselines = trivial_baselines(ctx.reader, ctx.split_name("train"), [n for n in dict.fromkeys(scored) if n not in unscored])
    if baselines:
        metrics["baselines"] = baselines
        metrics["timing"]["baselines_seconds"] = round(time.perf_counter() - t1, 2)
    classifiers = [r for r in records.values() if r.get("role") == "classifier"]
    if classifiers:
        train_s = sum(r.get("train_seconds") or 0.0 for r in classifiers)
        epochs = sum(r.get("epochs") or 0 for r in classifiers)
        metrics["timing"]["train_seconds"] = round(train_s, 1)
        metrics["timing"]["train_seconds_per_epoch"] = round(train_s / max(epochs, 1), 2)
    metrics["stages"] = {n: {k: v for k, v in r.items() if k != "entries"} for n, r in records.items()}
    return metrics


def label_check_of(metrics: dict) -> dict | None:
    """The label check recorded by the run's classifier stage (metrics.json ``stages``), if any."""
    for record in (metrics.get("stages") or {}).values():
        if isinstance(record, dict) and isinstance(record.get("label_check"), dict):
            return record["label_check"]
    return None


def versus_baselines(metrics: dict, split: str, miou) -> tuple[str, bool]:
    """(text to print beside a score of ``split``, whether the score is below the best trivial baseline there)."""
    b = ((metrics.get("baselines") or {}).get("splits") or {}).get(split)
    if not b or miou is None:
        return "", False
    parts, below = [], False
    best = b.get("best")
    if best:
        v = b[best]["miou"]
        below = miou < v
        parts.append(f"{'below the best' if below else 'best'} trivial baseline {v}: {LABELS.get(best, best)}")
    prior = (b.get("spatial_prior") or {}).get("miou")
    if prior is not None:
        parts.append(f"spatial prior {prior}")
    return (f" ({'; '.join(parts)})" if parts else ""), below


def summary_lines(metrics: dict) -> list[str]:
    """The headline numbers, for the terminal, each with the best trivial baseline of its split beside it."""
    lines = [f"run {metrics['run']}: {metrics['method']} / {metrics['backbone']} / {metrics['localizer']} "
             f"on {metrics['dataset']} (seed {metrics['seed']})"]
    sup = metrics.get("supervision")
    if sup:
        lines.append(f"  supervision: maps {sup['maps']}, pseudo masks {sup['pseudo']}, segmentation network "
                     f"{sup['seg']} ({'; '.join(f'{k} = {v}' for k, v in sorted(sup['about'].items()))})")
    check = label_check_of(metrics)
    if check and check.get("common"):
        lines.append(f"  label check ({check.get('verdict')}): {len(check['common'])} class(es) on at least "
                     f"{100 * check['common_fraction']:g}% of the training images, which image-level labels cannot "
                     f"localize: {', '.join(check['common'])}")
    if metrics.get("selection", {}).get("bg_threshold") is not None:
        sel = metrics["selection"]
        lines.append(f"  background threshold {sel['bg_threshold']} (chosen on {sel.get('chosen_on')})")
    below: list[str] = []

    def score(what: str, split: str, miou) -> str:
        text, low = versus_baselines(metrics, split, miou)
        if low:
            below.append(what)
        return f"mIoU {miou}{text}"

    for split, s in metrics["splits"].items():
        parts = [f"  {split:>8}: classifier mAP {s['classifier']['mAP']}"]
        if "maps" in s:
            parts.append(f"map {score(f'maps ({split})', split, s['maps']['miou'])}  "
                         f"class-avg acc {s['maps']['class_avg_acc']}  pixel acc {s['maps']['pixel_acc']}")
        lines.append("  ".join(parts))
    if "pseudo" in metrics:
        p = metrics["pseudo"]
        what = f"pseudo masks ({p['split']})"
        lines.append(f"  {what}: {score(what, p['split'], p['miou'])}")
    if metrics.get("not_scored"):
        lines.append(f"  no ground-truth masks on {', '.join(metrics['not_scored']['splits'])}: maps, pseudo masks and "
                     "predictions there are written but not scored")
    if "seg" in metrics:
        s = metrics["seg"]
        what = f"segmentation network ({s['split']})"
        lines.append(f"  segmentation network ({s['backbone']}, trained on {s['masks']} masks) on {s['split']}: "
                     f"{score(what, s['split'], s['miou'])}  class-avg acc {s['class_avg_acc']}  pixel acc {s['pixel_acc']}")
    for r in (metrics.get("self_training") or {}).get("rounds") or []:
        m, net = r["masks"], r.get("network") or {}
        rule = "" if r["round"] == 1 else (f", {m.get('rule')} {m.get('rule_value')} chosen on {m.get('chosen_on')}, "
                                             f"{100 * (m.get('kept_fraction') or 0):.1f}% of pixels kept")
        lines.append(f"  self-training round {r['round']}: masks ({m.get('source')}{rule}) train mIoU "
                     f"{m.get('train_miou')}; network " + ", ".join(f"{s} {v['miou']}" for s, v in net.items()))
    if below:
        lines.append(f"  below a trivial baseline: {', '.join(below)}. These scores are worse than a rule that never "
                     "looks at the pixels; the image-level labels may not fit this data (see the label check, and "
                     "README: 'Does your data suit image-level labels?').")
    return lines
