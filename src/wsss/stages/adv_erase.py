"""Adversarial Erasing's rounds (Wei et al., CVPR 2017; the method and its array rules: :mod:`wsss.methods.adv_erase`)
as a multi-round recipe of the pipeline: the recipe replaces the ``cls`` and ``maps`` stages by::

    cls        round 1, the plain classifier on the original images (keyed without the erasing options, so changing
               them keeps it)
    mined_r1   round 1's maps of the training split (the ``maps.*`` settings, image-level labels)
    cls_r<k>   round k: cumulative erase masks ``erase/<id>.png`` (round k-1's masks OR its mined regions), then a
               fresh classifier trained on the images erased by them (filled with the training mean colour)
    mined_r<k> round k's maps of the training split, on its erased inputs
    maps       per split, the per-class max of every round's maps; the training split with image-level labels reuses
               the mined maps, other splits go through the same chain of rounds (``maps/rounds/<split>/r<k>/``)

Each is a cached stage with its own key, so a killed run resumes at the round and epoch where it stopped. Images
whose cumulative erase covers more than ``max_erased_fraction`` are dropped from that round's training (listed with a
warning and in the round's ``stage.json``). Where the training split has ground truth, each mining stage scores its
round's maps alone and the union of the rounds so far (a diagnostic, not a selection).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.config import Config
from wsss.data.datasets import ClassificationDataset
from wsss.data.io import load_image
from wsss.data.readers import Sample
from wsss.data.transforms import TrainTransform
from wsss.engine.train import ClassifierTask
from wsss.errors import DataError
from wsss.evaluation import ThresholdSweep, confusion_matrix, segmentation_scores
from wsss.layout import CLS, MAPS
from wsss.localize import load_maps, save_maps
from wsss.methods.adv_erase import AdversarialErasing, check_maps_config, erase_region, erase_summary, union_maps
from wsss.pseudo import pseudo_mask
from wsss.runs import Stage, atomic_path
from wsss.stages import maps as maps_stage
from wsss.stages import train_cls
from wsss.stages.context import RunContext
from wsss.stages.declare import RECIPES, StageDecl, select

log = logging.getLogger("wsss.stages")


# -- erase masks ---------------------------------------------------------------------------------------------------


def save_erase_mask(path: Path, mask: np.ndarray) -> None:
    """A bilevel PNG (1 = erased), written atomically."""
    with atomic_path(Path(path), suffix=".png") as tmp:
        Image.fromarray(np.asarray(mask, bool)).save(tmp, format="PNG")


def load_erase_mask(path: Path, hw: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) bool erase mask; ``hw`` is checked against the image it is applied to."""
    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 0
    except FileNotFoundError:
        raise DataError(f"erase mask {path} does not exist (its round's erase step did not finish; rerun)") from None
    except OSError as e:
        raise DataError(f"{path}: damaged erase mask ({e}); delete it and rerun") from None
    if hw is not None and mask.shape != tuple(hw):
        raise DataError(f"{path}: erase mask is {mask.shape[0]}x{mask.shape[1]}, its image {hw[0]}x{hw[1]}")
    return mask


def mean_colour(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """Mean RGB over all pixels of the images (each image weighted by its pixel count), rounded to uint8."""
    total = np.zeros(3, np.float64)
    pixels = 0
    for s in samples:
        rgb = load_image(s.image)
        total += rgb.reshape(-1, 3).sum(0, dtype=np.float64)
        pixels += rgb.shape[0] * rgb.shape[1]
    if not pixels:
        raise DataError("mean colour of an empty image list")
    r, g, b = np.clip(np.rint(total / pixels), 0, 255).astype(int).tolist()
    return r, g, b


@dataclass
class ErasedInputs:
    """The image filter of a round: pixels of ``masks_dir/<id>.png`` filled with ``fill`` (RGB) in the original image,
    before any augmentation."""

    masks_dir: Path
    fill: tuple[int, int, int]

    def __call__(self, rgb: np.ndarray, sample_id: str) -> np.ndarray:
        mask = load_erase_mask(Path(self.masks_dir) / f"{sample_id}.png", rgb.shape[:2])
        out = rgb.copy()
        out[mask] = np.asarray(self.fill, np.uint8)
        return out


def write_erase_masks(samples, maps_dir: Path, prev_erase_dir: Path | None, out_dir: Path,
                      threshold: float) -> dict[str, float]:
    """``out_dir/<id>.png`` = the previous round's erase mask OR the pixels where its maps (``maps_dir/<id>.npz``)
    exceed ``threshold`` for any of the image's classes. Files already there are kept (a resumed run). Returns the
    erased fraction of every image."""
    fractions = {}
    for s in samples:
        out = out_dir / f"{s.id}.png"
        if out.exists():
            fractions[s.id] = float(load_erase_mask(out).mean())
            continue
        maps = load_maps(maps_dir / f"{s.id}.npz")["maps"]
        mask = erase_region(maps, threshold)
        if prev_erase_dir is not None:
            mask |= load_erase_mask(prev_erase_dir / f"{s.id}.png", mask.shape)
        save_erase_mask(out, mask)
        fractions[s.id] = float(mask.mean())
    return fractions


class ErasedClassifierTask(ClassifierTask):
    """The classifier of a round >= 2: images erased by the round's masks before augmentation."""

    def __init__(self, cfg, samples, spec, erase: ErasedInputs):
        super().__init__(cfg, samples, spec)
        self.erase = erase
        self.name = f"{cfg.method.name} {Path(erase.masks_dir).parent.name}"

    def dataset(self):
        t = self.cfg.train
        return ClassificationDataset(self.samples, self.spec,
                                     TrainTransform(t.crop_size, t.scale_range, t.hflip, self.spec.ignore_index),
                                     image_filter=self.erase)


# -- the rounds as stages ------------------------------------------------------------------------------------------


def cls_name(k: int) -> str:
    return CLS if k == 1 else f"cls_r{k}"


def mined_name(k: int) -> str:
    return f"mined_r{k}"


def _options(ctx_or_cfg):
    cfg = ctx_or_cfg if isinstance(ctx_or_cfg, Config) else ctx_or_cfg.cfg
    return AdversarialErasing(cfg.method.options).options


def _rounds_before(k: int) -> list[str]:
    """Every stage of the rounds before round ``k`` (classifier and mined maps), in order."""
    return [n for j in range(1, k) for n in (cls_name(j), mined_name(j))]


def _fill(inputs: dict) -> tuple[int, int, int]:
    """The erase fill of a run, recorded by its round 2."""
    return tuple(inputs[cls_name(2)].info()["fill"])


def _erase_filter(stage: Stage) -> ErasedInputs:
    return ErasedInputs(stage.dir / "erase", tuple(stage.info()["fill"]))


def check(ctx: RunContext) -> None:
    check_maps_config(ctx.cfg.maps)  # before the rounds, which take hours
    train_cls.check(ctx)


def compute_round(k: int):
    """Round ``k`` >= 2: erase masks from round k-1's mined maps, then a fresh classifier on the erased images."""

    def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
        opts = _options(ctx)
        labelled, skipped = train_cls.training_samples(ctx)
        everything = ctx.reader.samples(ctx.split_name("train"))
        fill = _fill(inputs) if k > 2 else mean_colour(labelled)
        prev_erase = inputs[cls_name(k - 1)].dir / "erase" if k > 2 else None
        # every image of the split gets a mask: the mined maps (reused by the maps stage) cover the whole split
        fractions = write_erase_masks(everything, inputs[mined_name(k - 1)].dir, prev_erase, stage.dir / "erase",
                                      opts.erase_threshold)
        summary = erase_summary({s.id: fractions[s.id] for s in labelled}, opts.max_erased_fraction)
        if summary["dropped"]:
            log.warning("cls round %d: %d image(s) erased over %.0f%% of their pixels are dropped from this round's "
                        "training: %s", k, len(summary["dropped"]), 100 * opts.max_erased_fraction,
                        ", ".join(summary["dropped"]))
        dropped = set(summary["dropped"])
        samples = [s for s in labelled if s.id not in dropped]
        if not samples:
            raise DataError(f"adv_erase round {k}: every training image is erased over "
                            f"{opts.max_erased_fraction:.0%} of its pixels; raise method.options.erase_threshold or "
                            "lower method.options.rounds")
        log.info("cls round %d/%d: training on %d erased images (mean erased %.1f%%, fill RGB %s)", k, opts.rounds,
                 len(samples), 100 * summary["fraction_mean"], fill)
        task = ErasedClassifierTask(ctx.cfg, samples, ctx.spec, ErasedInputs(stage.dir / "erase", fill))
        info = train_cls.train_classifier(ctx, task, stage.dir, skipped)
        return {**info, "round": k, "erase": summary, "fill": list(fill)}

    return compute


def compute_first_round(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    samples, skipped = train_cls.training_samples(ctx)
    log.info("cls round 1/%d: training %s/%s on %d images (%d skipped: empty label set)", _options(ctx).rounds,
             ctx.cfg.method.name, ctx.cfg.model.backbone, len(samples), len(skipped))
    return {**train_cls.train_classifier(ctx, samples, stage.dir, skipped), "round": 1, "label_check": ctx.label_check}


def compute_mined(k: int):
    """Round ``k``'s maps of the whole training split, on the inputs that round trained on."""

    def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
        rnd = inputs[cls_name(k)]
        samples = ctx.reader.samples(ctx.split_name("train"))
        model = maps_stage.inference_model(ctx, rnd.dir / "model.pt")
        info = maps_stage.extract(ctx, model, samples, stage.dir, "gt", _erase_filter(rnd) if k > 1 else None,
                                  what=f"round {k} (train)")
        dirs = [inputs[mined_name(j)].dir for j in range(1, k)] + [stage.dir]
        scores = _train_map_scores(ctx, samples, dirs)
        _log_round(k, rnd.info(), scores)
        return {**info, "role": "mining", "round": k, "train_map_scores": scores}

    return compute


def _train_map_scores(ctx: RunContext, samples, round_dirs) -> dict | None:
    """mIoU of the last round's maps alone and of the union of all rounds, on the images with ground truth."""
    samples = [s for s in samples if s.mask is not None]
    if not samples:
        return None
    spec = ctx.spec
    if spec.background is None:
        thresholds: list = [None]
    else:
        fixed = ctx.cfg.pseudo.bg_threshold
        thresholds = [fixed] if fixed is not None else list(ctx.cfg.eval.sweep)
    n = spec.num_classes
    conf = {"round": np.zeros((n, n), np.int64), "union": np.zeros((n, n), np.int64)}
    sweeps = {name: ThresholdSweep(spec, thresholds) for name in conf} if spec.background is not None else None
    for s in samples:
        parts = [load_maps(d / f"{s.id}.npz") for d in round_dirs]
        gt = ctx.reader.load_mask(s, parts[-1]["maps"].shape[1:])
        variants = {"round": (parts[-1]["maps"], parts[-1]["classes"]),
                    "union": union_maps([(p["maps"], p["classes"]) for p in parts])}
        for name, (maps, classes) in variants.items():
            if sweeps is not None:
                sweeps[name].add(maps, classes, gt)
            else:
                conf[name] += confusion_matrix(gt, pseudo_mask(maps, classes, spec), n, spec.ignore_index)
    if sweeps is None:
        return {name: segmentation_scores(c, spec.classes)["miou"] for name, c in conf.items()}
    best = {name: sw.best() for name, sw in sweeps.items()}
    return {**{name: b["miou"] for name, b in best.items()},
            "bg_threshold": {name: b["threshold"] for name, b in best.items()},
            "threshold": "pseudo.bg_threshold" if len(thresholds) == 1 else "best of eval.sweep on train (diagnostic)"}


def _log_round(k: int, info: dict, scores: dict | None) -> None:
    parts = [f"adv_erase round {k}: trained on {info.get('images')} images"]
    e = info.get("erase")
    if e:
        parts.append(f"erased mean {100 * e['fraction_mean']:.1f}% max {100 * e['fraction_max']:.1f}%, "
                     f"{e['over_erased']} over {100 * e['max_erased_fraction']:.0f}% dropped")
    if scores:
        parts.append(f"train map mIoU: this round {scores['round']}, union so far {scores['union']}")
    log.info("; ".join(parts))


# -- maps of every split: the union of the rounds --------------------------------------------------------------------


def _with_classes_of(samples, maps_dir):
    """``samples`` whose labels are the classes of their maps in ``maps_dir`` (round 1's choice of classes)."""
    out = []
    for s in samples:
        with np.load(maps_dir / f"{s.id}.npz", allow_pickle=False) as z:
            out.append(dataclasses.replace(s, labels=tuple(int(c) for c in z["classes"])))
    return out


def erase_chain(ctx: RunContext, samples, models, out_dir, labels: str, fill) -> list[Path]:
    """The rounds on images no classifier trained on: round 1 maps the images, round k the images erased where the
    maps of rounds < k exceed the erase threshold. ``models``: one checkpoint per round. Returns the per-round map
    folders ``out_dir/r<k>/maps``."""
    threshold = _options(ctx).erase_threshold
    dirs: list[Path] = []
    for k, checkpoint in enumerate(models, 1):
        rd = out_dir / f"r{k}"
        erase = None
        if k > 1:
            write_erase_masks(samples, dirs[-1], out_dir / f"r{k - 1}" / "erase" if k > 2 else None, rd / "erase",
                              threshold)
            erase = ErasedInputs(rd / "erase", fill)
        todo = [s for s in samples if not maps_stage.usable_map_file(rd / "maps" / f"{s.id}.npz")]
        if todo:
            round_samples = todo if k == 1 or labels == "gt" else _with_classes_of(todo, dirs[0])
            model = maps_stage.inference_model(ctx, checkpoint)
            maps_stage.extract(ctx, model, round_samples, rd / "maps", labels if k == 1 else "gt", erase,
                               what=f"round {k}")
            del model
        dirs.append(rd / "maps")
    return dirs


def write_union(samples, round_dirs, out_dir) -> int:
    """``out_dir/<id>.npz`` = per-class max of the rounds' maps; scores are round 1's (the unerased image)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in samples:
        out = out_dir / f"{s.id}.npz"
        if maps_stage.usable_map_file(out):
            continue
        parts = [load_maps(d / f"{s.id}.npz") for d in round_dirs]
        maps, classes = union_maps([(p["maps"], p["classes"]) for p in parts])
        save_maps(out, maps, classes, parts[0]["scores"])
        n += 1
    return n


def compute_union_maps(rounds: int):
    def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
        cfg = ctx.cfg
        info = dict(stage.info().get("splits") or {})  # a variant extended by a split keeps the others' records
        for role in cfg.maps.splits:
            split = ctx.split_name(role)
            samples = ctx.reader.samples(split)
            reuse = split == ctx.split_name("train") and cfg.maps.labels == "gt"
            if reuse:
                round_dirs = [inputs[mined_name(k)].dir for k in range(1, rounds + 1)]
            else:
                fill = _fill(inputs) if rounds > 1 else None
                round_dirs = erase_chain(ctx, samples, [inputs[cls_name(k)].dir / "model.pt" for k in range(1, rounds + 1)],
                                         stage.dir / "rounds" / split, cfg.maps.labels, fill)
            info[split] = {"images": len(samples), "computed": write_union(samples, round_dirs, stage.dir / split),
                           "rounds": rounds, "reused_mined_maps": reuse}
            maps_stage.verify_complete(samples, stage.dir / split)
            log.info("maps: %s %s", split, info[split])
        return {"splits": info, "rounds": rounds}

    return compute


@RECIPES.register(AdversarialErasing.name)
def declare_rounds(decls: list[StageDecl], cfg: Config) -> list[StageDecl]:
    """Replace ``cls`` by the rounds and ``maps`` by the union of the rounds' maps."""
    opts = _options(cfg)
    rounds = opts.rounds

    def erase_opts(c: Config) -> dict:
        o = _options(c)
        return {"erase_threshold": o.erase_threshold, "max_erased_fraction": o.max_erased_fraction}

    mining = ("maps", "-maps.labels", "-maps.pred_threshold", "-maps.splits", "data.train_split", "runtime.precision")
    out: list[StageDecl] = []
    for d in decls:
        if d.name == CLS:
            first = dataclasses.replace(d, compute=compute_first_round, check=check,
                                        keyed_by=("data", "-data.val_split", "-data.test_split", "model",
                                                  "method.name", "train", "runtime", "seed"))
            out += [first, StageDecl(mined_name(1), compute_mined(1), (CLS,), mining)]
            for k in range(2, rounds + 1):
                out += [StageDecl(cls_name(k), compute_round(k), tuple(_rounds_before(k)), erase_opts),
                        StageDecl(mined_name(k), compute_mined(k), tuple(_rounds_before(k) + [cls_name(k)]), mining)]
        elif d.name == MAPS:
            def union_settings(c: Config, maps_keyed_by=d.keyed_by) -> list:
                return [select(c, maps_keyed_by), _options(c).erase_threshold]

            out.append(dataclasses.replace(d, compute=compute_union_maps(rounds), inputs=tuple(_rounds_before(rounds + 1)),
                                           keyed_by=union_settings))
        else:
            out.append(d)
    return out


__all__ = ["ErasedClassifierTask", "ErasedInputs", "declare_rounds", "erase_chain", "load_erase_mask", "mean_colour",
           "save_erase_mask", "write_erase_masks", "write_union"]
