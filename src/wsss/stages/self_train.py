"""Self-training rounds: the segmentation network relabels its own training images and a new network trains on the
new labels (``self_train.rounds`` > 1).

The practice: Lee, "Pseudo-Label", ICML workshop 2013 (a network's confident predictions as labels); Khoreva et al.,
"Simple Does It", CVPR 2017 (recursive training of a segmentation network on its own CRF-refined predictions, with
what is known for certain -- there the boxes, here the image-level labels -- enforced each round); Zou et al., "Class-
Balanced Self-Training", ECCV 2018 (per-class confidence quantiles, so that rare, hard classes keep labels). ToCo
(Ru et al., CVPR 2023) and DuPL (Wu et al., CVPR 2024) do the same online with confidence filtering.

With ``self_train.rounds: K`` the pipeline's declaration reads::

    ... pseudo, seg, relabel_r2, seg_r2, ..., relabel_rK, seg_rK, pred, eval

- ``relabel_r<k>``: round k-1's network on the training split (softmax averaged over ``self_train.scales`` and
  mirrors), restricted to the image's labelled classes (background stays allowed where the dataset has one: a class
  absent from the image-level labels is never predicted), optionally the dense CRF of those probabilities on the
  image (``self_train.crf``), then the confidence rule: pixels the rule does not trust become ignore (255).
  ``relabel_r<k>/<split>/<id>.png`` are the masks; ``confidence/<split>/<id>.npz`` the arg-max and its probability
  (kept for analysis, and so that a killed stage resumes image by image).
  With ``self_train.masks: agreement`` the labels are instead the masks round k-1 trained on (the pseudo masks for
  round 2), kept where that restricted prediction agrees with them and ignore where it does not: the network, which
  cannot fit a training label that contradicts the rest of its data, flags the labels most likely wrong (the rule of
  Khoreva et al.'s M-and-G+ masks -- two label sources, ignore where they disagree -- with the network as the second
  source; the small-loss criterion of noisy-label learning, e.g. Han et al., "Co-teaching", NeurIPS 2018, in its
  hard form). Nothing is relabelled, only removed.
- ``seg_r<k>``: round k's network, trained on those masks with ``seg.train``, from the ``seg.model`` weights
  (``init: imagenet``) or from round k-1's network (``init: previous``).
- ``pred`` predicts ``seg.predict_split`` with the last round's network.

Every round's network is scored on the selection split (val) and the prediction split (test) with the inference
settings of ``seg`` (``round_scores`` in its record), and each relabelling on the training split, as written (ignore
excluded) and before the confidence rule. metrics.json holds them as ``self_training.rounds`` and the report draws
them as a curve.

**The confidence rule, chosen on val.** ``threshold``: a pixel is kept where its winning probability is at least the
threshold. ``quantile``: per predicted class, the least confident ``drop`` fraction of that class's pixels over the
split are ignored (CBST's class-balanced rule, with the quantile taken on the split being labelled). A value left null
is chosen on ``eval.select_on`` among ``self_train.candidates``: the same prediction, restriction and rule applied to
the selection split's images, scored by :func:`confidence_value` -- per ground-truth class, (kept pixels labelled
right - kept pixels labelled wrong) / the class's pixels, averaged over the classes. A kept right label helps the
next round, a kept wrong one teaches a mistake, an ignored one does neither; so the value rises while the pixels a
stricter rule drops are mostly wrong and falls once they are mostly right. The mIoU of the kept pixels alone cannot
choose: it rises as the rule keeps fewer pixels.

Under torchrun (:mod:`wsss.engine.shard`) each process predicts and writes its share of the images (the relabelling,
the choice on val, the rounds' scores), as the other per-image stages do.

Where this differs: the rounds retrain offline (a stage per round, resumable), not online as in ToCo / DuPL; the
refiner chain of ``pseudo.refiners`` is not applied to the network's probabilities (its affinity refiners walk on
the classifier's maps at their stride; the dense CRF is offered as ``self_train.crf``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsss.config import Config, split_name
from wsss.config.typed import to_dict
from wsss.data.io import load_image, load_mask, save_mask_png
from wsss.data.readers import Sample
from wsss.engine import shard
from wsss.engine.train import fit
from wsss.errors import ConfigError, DataError
from wsss.evaluation import confusion_matrix, segmentation_scores
from wsss.layout import EVAL, PRED, PSEUDO, SEG
from wsss.refine import check_crf_config, dense_crf
from wsss.runs import Stage, atomic_path
from wsss.stages import evaluate
from wsss.stages import seg as seg_stage
from wsss.stages.context import RunContext
from wsss.stages.declare import StageDecl

log = logging.getLogger("wsss.stages")

#: histogram bins of the winning probabilities, for the per-class quantiles
BINS = 1000


def seg_name(k: int) -> str:
    return SEG if k == 1 else f"seg_r{k}"


def relabel_name(k: int) -> str:
    return f"relabel_r{k}"


# -- array rules ---------------------------------------------------------------------------------------------------


def allowed_classes(labels: Sequence[int], spec) -> np.ndarray:
    """(C,) bool: the image's labelled classes, and the background class where the dataset has one."""
    allowed = np.zeros(spec.num_classes, bool)
    allowed[list(labels)] = True
    if spec.background is not None:
        allowed[spec.background] = True
    return allowed


def restrict(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray | None:
    """``probs`` (C, H, W) with the classes outside ``allowed`` set to 0 and each pixel renormalised over the allowed
    ones (uniform over them where all are 0); None when no class is allowed."""
    if not allowed.any():
        return None
    p = probs * allowed[:, None, None]
    total = p.sum(0, keepdims=True)
    uniform = np.broadcast_to((allowed / allowed.sum()).astype(np.float32)[:, None, None], p.shape)
    return np.where(total > 0, p / np.maximum(total, 1e-12), uniform).astype(np.float32)


def class_thresholds(rule: str, value: float | None, hist: np.ndarray | None, num_classes: int) -> np.ndarray:
    """(C,) per-class confidence thresholds: ``value`` for every class (``threshold``), 0 (``none``), or for
    ``quantile`` the ``value`` quantile of each predicted class's winning probabilities (``hist``: (C, BINS)
    counts over [0, 1]); a pixel is kept where its probability is at least its class's threshold."""
    if rule == "none":
        return np.zeros(num_classes, np.float32)
    if rule == "threshold":
        return np.full(num_classes, value, np.float32)
    out = np.zeros(num_classes, np.float32)
    for c in range(num_classes):
        n = hist[c].sum()
        if n == 0 or value == 0:
            continue
        # the lower edge of the first bin at which at least `value` of the class's pixels lie below its upper edge
        below = np.cumsum(hist[c]) / n
        out[c] = np.searchsorted(below, value, side="left") / BINS
    return out


def agreed(label: np.ndarray, previous: np.ndarray, ignore_index: int) -> np.ndarray:
    """``previous`` where ``label`` equals it, ``ignore_index`` elsewhere (and where either already was); the
    caller reads ``previous`` with :func:`~wsss.data.io.load_mask` at ``label``'s size, which names a file that does
    not fit."""
    return np.where((label == previous) & (label != ignore_index), previous, ignore_index).astype(np.uint8)


def previous_masks(k: int) -> str:
    """The stage holding the masks round k-1 trained on."""
    return PSEUDO if k == 2 else relabel_name(k - 1)


def filtered(label: np.ndarray, conf: np.ndarray, thresholds: np.ndarray, ignore_index: int) -> np.ndarray:
    """``label`` with 255 (ignore) where ``conf`` is below its class's threshold (and where it already was)."""
    out = label.copy()
    valid = label != ignore_index
    low = np.zeros_like(valid)
    low[valid] = conf[valid] < thresholds[label[valid]]
    out[low] = ignore_index
    return out


class ConfidenceValue:
    """Accumulates :func:`confidence_value` over images, for several candidate rules at once."""

    def __init__(self, num_classes: int, candidates: int, ignore_index: int):
        self.n, self.ignore = num_classes, ignore_index
        self.right = np.zeros((candidates, num_classes), np.int64)
        self.wrong = np.zeros((candidates, num_classes), np.int64)
        self.pixels = np.zeros(num_classes, np.int64)

    def add(self, gt: np.ndarray, masks: Sequence[np.ndarray]) -> None:
        """``masks``: the image's labels under each candidate rule (255 = ignored)."""
        scored = gt != self.ignore
        g = gt[scored].astype(np.int64)
        self.pixels += np.bincount(g, minlength=self.n)[: self.n]
        for i, m in enumerate(masks):
            p = m[scored]
            kept = p != self.ignore
            self.right[i] += np.bincount(g[kept & (p == g)], minlength=self.n)[: self.n]
            self.wrong[i] += np.bincount(g[kept & (p != g)], minlength=self.n)[: self.n]

    def kept(self) -> np.ndarray:
        """Per candidate: whether it keeps any scored pixel."""
        return (self.right + self.wrong).sum(1) > 0

    def values(self) -> np.ndarray:
        """Per candidate: mean over ground-truth classes of (kept right - kept wrong) / the class's pixels."""
        present = self.pixels > 0
        if not present.any():
            return np.zeros(len(self.right))
        return ((self.right - self.wrong)[:, present] / self.pixels[present]).mean(1)


def confidence_value(gt: np.ndarray, masks: Sequence[np.ndarray], num_classes: int, ignore_index: int = 255):
    """The value of each of ``masks`` (one image's labels under several rules) as training labels: see the module
    docstring. One image; :class:`ConfidenceValue` accumulates a split."""
    acc = ConfidenceValue(num_classes, len(masks), ignore_index)
    acc.add(gt, masks)
    return acc.values()


# -- relabelling ---------------------------------------------------------------------------------------------------


def _save_confidence(path: Path, label: np.ndarray, conf: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, label=label.astype(np.uint8), conf=conf.astype(np.float16))


def _load_confidence(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["label"], z["conf"].astype(np.float32)
    except (OSError, ValueError, KeyError):
        return None


def write_confidence(ctx: RunContext, model, device, samples: list[Sample], folder: Path, what: str) -> int:
    """``folder/<id>.npz`` (arg-max, its probability) of every image: the network's probabilities restricted to the
    image's labels (then CRF-refined with ``self_train.crf``). Files already there are kept (a resumed stage); a
    damaged one is recomputed. Returns the number computed."""
    st, spec = ctx.cfg.self_train, ctx.spec
    # under torchrun (wsss.engine.shard) every process works from rank 0's list of what is left, predicts its share of
    # the batches one process would form, and all meet before the files are read
    todo = shard.undone(range(len(samples)), lambda i: _load_confidence(folder / f"{samples[i].id}.npz") is not None)
    if not todo:
        return 0
    for batch, probs in seg_stage.predict_batches(ctx, model, device, samples, todo, st.scales, st.flip, what,
                                                  sharded=True):
        for b, i in enumerate(batch["index"]):
            s = samples[int(i)]
            p = restrict(probs[b], allowed_classes(s.labels or (), spec))
            if p is None:  # no labelled class, no background: nothing to label
                label = np.full(probs.shape[-2:], spec.ignore_index, np.uint8)
                conf = np.zeros(probs.shape[-2:], np.float32)
            else:
                if st.crf:
                    p = dense_crf(load_image(s.image), p, ctx.cfg.crf)
                label, conf = p.argmax(0).astype(np.uint8), p.max(0)
            _save_confidence(folder / f"{s.id}.npz", label, conf)
    shard.barrier()  # every process's files are written
    return len(todo)


def _histograms(samples, folder: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    hist = np.zeros((num_classes, BINS), np.int64)
    for s in samples:
        label, conf = _load_confidence(folder / f"{s.id}.npz")
        valid = label != ignore_index
        bins = np.minimum((conf[valid] * BINS).astype(np.int64), BINS - 1)
        np.add.at(hist, (label[valid].astype(np.int64), bins), 1)
    return hist


def _rule_value(st) -> float | None:
    return {"threshold": st.threshold, "quantile": st.drop, "none": 0.0}[st.confidence]


def _setting(st) -> str:
    return {"threshold": "self_train.threshold", "quantile": "self_train.drop"}.get(st.confidence, "")


def choose_rule(ctx: RunContext, model, device, folder: Path) -> dict:
    """The confidence rule's value: the configured one, or the best of ``self_train.candidates`` on the selection
    split by :func:`confidence_value` (its per-image labels in ``folder``)."""
    st, spec = ctx.cfg.self_train, ctx.spec
    value = _rule_value(st)
    if value is not None:
        return {"value": value, "chosen_on": "config"}
    split = ctx.split_name(ctx.cfg.eval.select_on)
    samples = [s for s in ctx.reader.samples(split) if s.mask is not None]
    write_confidence(ctx, model, device, samples, folder, f"relabel {split} (choosing {_setting(st)})")
    hist = _histograms(samples, folder, spec.num_classes, spec.ignore_index) if st.confidence == "quantile" else None
    rules = [class_thresholds(st.confidence, v, hist, spec.num_classes) for v in st.candidates]
    acc = ConfidenceValue(spec.num_classes, len(rules), spec.ignore_index)
    for s in samples:
        label, conf = _load_confidence(folder / f"{s.id}.npz")
        gt = ctx.reader.load_mask(s, label.shape)
        acc.add(gt, [filtered(label, conf, t, spec.ignore_index) for t in rules])
    values = acc.values()
    if not acc.kept().any():
        raise DataError(f"self-training: no candidate of self_train.candidates keeps a pixel of split '{split}' "
                        f"({_setting(st)} {st.candidates}): the network's probabilities are all below them; add lower "
                        "candidates or set the value")
    values = np.where(acc.kept(), values, -np.inf)  # a rule that keeps nothing teaches nothing
    best = int(np.argmax(values))
    table = {str(v): (round(float(x), 4) if np.isfinite(x) else None) for v, x in zip(st.candidates, values)}
    log.info("self-training: %s %s chosen on %s (value %s)", _setting(st), st.candidates[best], split, table)
    return {"value": st.candidates[best], "chosen_on": split, "values": table}


def compute_relabel(k: int):
    """Round k's masks: round k-1's network on the training split, restricted, refined, filtered."""

    def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
        cfg, spec = ctx.cfg, ctx.spec
        st = cfg.self_train
        t0 = time.perf_counter()
        previous = inputs[seg_name(k - 1)]
        model, device = seg_stage.segmenter_on_device(ctx, previous)
        info: dict = {"role": "relabel", "round": k}
        if "round_scores" not in previous.info():  # round 1 trained before self-training was configured
            info["previous_round_scores"] = score_network(ctx, model, device)
        select = ctx.split_name(cfg.eval.select_on)
        choice = choose_rule(ctx, model, device, stage.dir / "confidence" / select)
        split = ctx.split_name(cfg.pseudo.split)
        samples = ctx.reader.samples(split)
        folder = stage.dir / "confidence" / split
        computed = write_confidence(ctx, model, device, samples, folder, f"relabel {split} (round {k})")
        hist = _histograms(samples, folder, spec.num_classes, spec.ignore_index) if st.confidence == "quantile" else None
        thresholds = class_thresholds(st.confidence, choice["value"], hist, spec.num_classes)
        palette = spec.palette_bytes()
        n = spec.num_classes
        conf_kept, conf_all = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
        kept = total = 0
        before = inputs[previous_masks(k)].dir / split if st.masks == "agreement" else None
        for s in shard.shard(samples):  # under torchrun this process's share; the sums are gathered below
            label, conf = _load_confidence(folder / f"{s.id}.npz")
            if before is not None:
                label = agreed(label, load_mask(before / f"{s.id}.png", n, spec.ignore_index, label.shape),
                               spec.ignore_index)
            mask = filtered(label, conf, thresholds, spec.ignore_index)
            save_mask_png(stage.dir / split / f"{s.id}.png", mask, palette)
            kept += int((mask != spec.ignore_index).sum())
            total += mask.size
            if s.mask is not None:
                gt = ctx.reader.load_mask(s, mask.shape)
                conf_kept += confusion_matrix(gt, mask, n, spec.ignore_index)
                conf_all += confusion_matrix(gt, label, n, spec.ignore_index)
        kept, total, conf_kept, conf_all = (sum(x) for x in zip(*shard.gather((kept, total, conf_kept, conf_all)),
                                                                  strict=True))  # every share's masks are written
        info.update({"split": split, "images": len(samples), "computed": computed, "masks": st.masks,
                     "rule": st.confidence,
                     "rule_value": choice["value"], "chosen_on": choice["chosen_on"], "crf": st.crf,
                     "kept_fraction": round(kept / max(total, 1), 4),
                     "class_thresholds": {c: round(float(t), 3) for c, t in zip(spec.classes, thresholds)},
                     "seconds": round(time.perf_counter() - t0, 1)})
        if "values" in choice:
            info["candidate_values"] = choice["values"]
        if any(s.mask is not None for s in samples):
            kept_scores = segmentation_scores(conf_kept, spec.classes)
            info["train_scores"] = {"miou": kept_scores["miou"], "per_class_iou": _per_class(kept_scores),
                                    "miou_before_confidence_rule": segmentation_scores(conf_all, spec.classes)["miou"]}
        log.info("self-training round %d: masks of %d images, %s %s (chosen on %s), %.1f%% of pixels kept%s", k,
                 len(samples), st.confidence, choice["value"], choice["chosen_on"], 100 * info["kept_fraction"],
                 f", train mIoU {info['train_scores']['miou']}" if "train_scores" in info else "")
        return info

    return compute


# -- the networks --------------------------------------------------------------------------------------------------


def _per_class(scores: dict) -> dict:
    return {c: v["iou"] for c, v in scores["per_class"].items()}


def score_network(ctx: RunContext, model, device) -> dict:
    """The network alone (``seg.scales`` / ``seg.flip``, no image labels) on the selection and prediction splits that
    have ground truth: mIoU and per-class IoU. Under torchrun each process scores its share of the images."""
    cfg, spec = ctx.cfg, ctx.spec
    out = {}
    for role in dict.fromkeys([cfg.eval.select_on, cfg.seg.predict_split]):
        split = ctx.split_name(role)
        samples = [s for s in ctx.reader.samples(split) if s.mask is not None]
        if not samples:
            continue
        conf = np.zeros((spec.num_classes,) * 2, np.int64)
        for batch, probs in seg_stage.predict_batches(ctx, model, device, samples, range(len(samples)), cfg.seg.scales,
                                                      cfg.seg.flip, f"score {split}", sharded=True):
            for b, i in enumerate(batch["index"]):
                pred = probs[b].argmax(0)
                conf += confusion_matrix(ctx.reader.load_mask(samples[int(i)], pred.shape), pred, spec.num_classes,
                                         spec.ignore_index)
        conf = sum(shard.gather(conf))  # under torchrun: every process's share
        scores = segmentation_scores(conf, spec.classes)
        out[split] = {"miou": scores["miou"], "per_class_iou": _per_class(scores)}
    return out


def _scored(ctx: RunContext, info: dict, stage: Stage) -> dict:
    model, device = seg_stage.segmenter_on_device(ctx, stage)
    return {**info, "round_scores": score_network(ctx, model, device)}


def compute_first_round(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    info = seg_stage.compute_train(ctx, inputs, stage)
    return _scored(ctx, {**info, "round": 1}, stage)


def compute_round(k: int):
    def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
        cfg = ctx.cfg
        relabel = inputs[relabel_name(k)]
        folder = relabel.dir / relabel.info()["split"]
        samples = ctx.reader.samples(relabel.info()["split"])
        seg_stage.check_pseudo_folder(folder, samples)
        init = inputs[seg_name(k - 1)].dir / "model.pt" if cfg.self_train.init == "previous" else None
        log.info("seg round %d/%d: training DeepLabV3/%s on %d images relabelled by round %d (init: %s)", k,
                 cfg.self_train.rounds, cfg.seg.model.backbone, len(samples), k - 1, cfg.self_train.init)
        task = seg_stage.SegTask(cfg, samples, ctx.spec, seg_stage.PseudoMasks(folder, ctx.spec.num_classes,
                                                                              ctx.spec.ignore_index), init,
                                 seg_stage.backbone_init(inputs))
        task.name = f"deeplabv3 round {k}"
        result = fit(task, stage.dir, ctx.after_epoch)
        info = {"role": "seg", "round": k, "images": len(samples), "masks": f"relabelled by round {k - 1}",
                "init": cfg.self_train.init, "epochs": len(result["history"]),
                "train_seconds": round(sum(r["seconds"] for r in result["history"]), 1)}
        return _scored(ctx, info, stage)

    return compute


# -- metrics -------------------------------------------------------------------------------------------------------


def rounds_table(ctx: RunContext, inputs: dict, pseudo_scores: dict | None) -> list[dict]:
    """Per round: the masks it trained on (train mIoU, kept fraction) and its network's scores."""
    rows = []
    for k in range(1, ctx.cfg.self_train.rounds + 1):
        net = inputs[seg_name(k)].info()
        scores = net.get("round_scores")
        if scores is None and k < ctx.cfg.self_train.rounds:
            scores = inputs[relabel_name(k + 1)].info().get("previous_round_scores")
        row: dict = {"round": k, "network": scores, "train_seconds": net.get("train_seconds")}
        if k == 1:
            row["masks"] = {"source": "pseudo", "train_miou": (pseudo_scores or {}).get("miou")}
        else:
            r = inputs[relabel_name(k)].info()
            row["masks"] = {"source": f"relabelled by round {k - 1}", "rule": r.get("rule"),
                            "rule_value": r.get("rule_value"), "chosen_on": r.get("chosen_on"),
                            "kept_fraction": r.get("kept_fraction"), "seconds": r.get("seconds"),
                            "train_miou": (r.get("train_scores") or {}).get("miou"),
                            "train_miou_before_confidence_rule":
                                (r.get("train_scores") or {}).get("miou_before_confidence_rule"),
                            "train_per_class_iou": (r.get("train_scores") or {}).get("per_class_iou")}
        rows.append(row)
    return rows


def compute_eval(ctx: RunContext, inputs: dict, stage=None) -> dict:
    last = seg_name(ctx.cfg.self_train.rounds)
    metrics = evaluate.metrics_of(ctx, inputs, network=last)
    metrics["self_training"] = {"rounds": rounds_table(ctx, inputs, metrics.get("pseudo")),
                                "settings": to_dict(ctx.cfg.self_train)}
    evaluate.write_metrics(ctx, metrics)
    return metrics


# -- the declaration -----------------------------------------------------------------------------------------------


def check(ctx: RunContext) -> None:
    """Before anything runs: a split to choose the confidence rule on, the CRF settings."""
    cfg = ctx.cfg
    st = cfg.self_train
    if st.crf:
        check_crf_config(cfg.crf)
    if _rule_value(st) is None and st.masks == "agreement":
        # the value would be chosen for the network's own labels on val, where there are no previous masks to
        # agree with: a rule chosen for other labels than the ones it filters
        raise ConfigError(f"{_setting(st)}: null chooses it on val for the network's own "
                          "labels, but self_train.masks=agreement filters the previous masks; set "
                          "self_train.confidence: none (agreement alone) or give the value")
    if _rule_value(st) is None:
        split = ctx.split_name(cfg.eval.select_on)
        if not any(s.mask is not None for s in ctx.reader.samples(split)):
            raise ConfigError(f"{_setting(st)}: null chooses it on split '{split}' "
                              "(eval.select_on), which has no ground-truth masks; set it in the config")
    if not cfg.seg.enabled or cfg.seg.masks != "pseudo" or cfg.seg.loss != "ce":
        raise ConfigError("self_train.rounds > 1 needs the segmentation network trained on pseudo masks with "
                          "cross-entropy (seg.enabled: true, seg.masks: pseudo, seg.loss: ce)")


def relabel_settings(cfg: Config) -> dict:
    st = cfg.self_train
    out: dict = {"scales": st.scales, "flip": st.flip, "crf": st.crf, "confidence": st.confidence,
                 "split": split_name(cfg, cfg.pseudo.split)}
    if st.masks != "network":  # absent by default, so that rounds keyed before the option are still found
        out["masks"] = st.masks
    if st.crf:
        out["crf_settings"] = seg_stage.without(cfg.crf, "workers")
    if st.confidence != "none":
        value = _rule_value(st)
        out["value"] = value
        if value is None:
            out["candidates"] = st.candidates
            out["select_on"] = split_name(cfg, cfg.eval.select_on)
    return out


def round_settings(cfg: Config) -> dict:
    out = seg_stage.train_settings(cfg)
    out.pop("source")  # the masks are the relabelling stage's (an input)
    return {**out, "init": cfg.self_train.init}


def declare_rounds(decls: list[StageDecl], cfg: Config) -> list[StageDecl]:
    """With ``self_train.rounds`` > 1: the relabelling and training stages of every round after the first inserted
    after ``seg``; ``pred`` and ``eval`` read the last round's network."""
    rounds = cfg.self_train.rounds
    if rounds == 1:
        return decls
    names = [d.name for d in decls]
    if SEG not in names or PRED not in names:
        raise ConfigError("self_train.rounds > 1 needs the segmentation network (seg.enabled: true)")
    last = seg_name(rounds)
    out: list[StageDecl] = []
    for d in decls:
        if d.name == SEG:
            out.append(dataclasses.replace(d, compute=compute_first_round))
            for k in range(2, rounds + 1):
                sources = (seg_name(k - 1),) + ((previous_masks(k),) if cfg.self_train.masks == "agreement" else ())
                out.append(StageDecl(relabel_name(k), compute_relabel(k), sources, relabel_settings,
                                     check if k == 2 else None))
                previous = (seg_name(k - 1),) if cfg.self_train.init == "previous" else seg_stage.classifier_init(cfg)
                out.append(StageDecl(seg_name(k), compute_round(k), (relabel_name(k), *previous), round_settings))
        elif d.name == PRED:
            def predict(ctx, inputs, stage, compute=d.compute):
                return compute(ctx, {**inputs, SEG: inputs[last]}, stage)

            out.append(dataclasses.replace(d, compute=predict, inputs=(last,)))
        elif d.name == EVAL:
            out.append(dataclasses.replace(d, compute=compute_eval))
        else:
            out.append(d)
    return out


__all__ = ["ConfidenceValue", "agreed", "allowed_classes", "class_thresholds", "confidence_value", "declare_rounds", "filtered",
           "relabel_name", "restrict", "rounds_table", "score_network", "seg_name", "write_confidence"]
