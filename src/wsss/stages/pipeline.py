"""The pipeline, declared in one place: which stages run, in which order, what each reads and what keys it.

    cls     train the classifier of ``method.name``          (wsss.stages.train_cls)
    maps    localization maps of the configured splits        (wsss.stages.maps)
    pseudo  pseudo masks of the training split (refiners)     (wsss.stages.pseudo)
    seg     segmentation network on the pseudo masks          (wsss.stages.seg)
    pred    the segmentation network alone on a held-out split (wsss.stages.seg)
    eval    every score -> metrics.json                        (wsss.stages.evaluate)

A stage declares its inputs (earlier stages) and the config settings that change its output; its key is the hash of
its name, its inputs' keys and those settings, so changing ``maps.scales`` recomputes maps and everything after
them but reuses the classifier. Settings that cannot change a result (loader workers, progress bars, inference
batch size, CRF worker processes) are in no key (:data:`NOT_IN_KEYS`).

A multi-round recipe (:data:`RECIPES`, e.g. Adversarial Erasing) rewrites the declaration: it may replace a stage by
several (one per round, each a cached, resumable stage with its own key) as long as the stage names that later
stages read stay provided.

A refiner of ``pseudo.refiners`` may need stages of its own before the pseudo stage (IRN and PSA train their
affinity networks on the run's maps): :meth:`wsss.refine.Refiner.stages` declares them, and
:func:`with_refiner_stages` inserts them after ``maps`` (after the recipe) and adds them to the pseudo stage's inputs,
so the pseudo stage's key includes theirs and its refiners get them, complete, in ``prepare``. With
``pseudo.refiners: [irn, crf]`` the declaration reads ``cls, maps, irn, pseudo, seg, pred, eval``.

:class:`Pipeline` runs a target and what it needs: every check of every stage that will compute runs first (a bad
split, class name, localizer, backbone or weight file fails before anything is trained or deleted), then, holding
the run directory's lock, each stage is reused when complete under its key or computed into its folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

from wsss.config import config_hash, dump_config
from wsss.data.readers import check_splits
from wsss.engine import shard
from wsss.errors import ConfigError
from wsss.layout import CLS, EVAL, MAPS, PRED, PSEUDO, SEG
from wsss.refine import build_chain
from wsss.runs import RunLock, Stage
from wsss.stages import (
    adv_erase,  # noqa: F401  (registers Adversarial Erasing's rounds in RECIPES)
    evaluate,
    maps,
    pseudo,
    seg,
    self_train,
    train_cls,
)
from wsss.stages.context import RunContext
from wsss.stages.declare import RECIPES, StageDecl

log = logging.getLogger("wsss.pipeline")

STAGES: tuple[StageDecl, ...] = (
    StageDecl(CLS, train_cls.compute, (), train_cls.key_settings, train_cls.check),
    # the maps of a split do not depend on which other splits are mapped: maps.splits is in no key, and a variant
    # missing a split that is now asked for is extended (maps.covers)
    StageDecl(MAPS, maps.compute, (CLS,), ("maps", "-maps.splits", "runtime.precision"), maps.check,
              covers=maps.covers),
    StageDecl(PSEUDO, pseudo.compute, (MAPS,), pseudo.key_settings, pseudo.check),
    StageDecl(SEG, seg.compute_train, seg.train_inputs, seg.train_settings, seg.check_train,
              enabled=lambda cfg: cfg.seg.enabled),
    StageDecl(PRED, seg.compute_predict, (SEG,), seg.predict_settings, seg.check_predict,
              enabled=lambda cfg: cfg.seg.enabled),
    StageDecl(EVAL, evaluate.compute, evaluate.inputs, cached=False),
)


def used_splits(cfg) -> list[str]:
    """Every split (role or name) a run of ``cfg`` reads."""
    roles = ["train", *cfg.maps.splits, cfg.pseudo.split, cfg.eval.select_on]
    if cfg.seg.enabled:
        roles.append(cfg.seg.predict_split)
    return list(dict.fromkeys(roles))


def with_refiner_stages(decls: list[StageDecl], cfg) -> list[StageDecl]:
    """``decls`` with the stages the refiners of ``pseudo.refiners`` declare (:meth:`wsss.refine.Refiner.stages`)
    inserted after ``maps``, and added to the pseudo stage's inputs."""
    extra = [d for r in build_chain(cfg) for d in r.stages()]
    if not extra:
        return decls
    names = [d.name for d in decls]
    for i, d in enumerate(extra):
        if d.name in names or d.name in [e.name for e in extra[:i]]:
            raise ConfigError(f"pseudo.refiners: a refiner declares the stage '{d.name}', which the pipeline already "
                              f"has ({', '.join(names)})")
    needed = tuple(d.name for d in extra)
    pseudo_decl = decls[names.index(PSEUDO)]
    with_inputs = dataclasses.replace(pseudo_decl, inputs=lambda cfg: (*pseudo_decl.input_names(cfg), *needed))
    at = names.index(MAPS) + 1
    return [*decls[:at], *extra, *(with_inputs if d is pseudo_decl else d for d in decls[at:])]


# Self-training rounds (``self_train.rounds`` > 1) come last: wsss.stages.self_train.declare_rounds inserts each
# round's relabelling and training stages after ``seg`` and points ``pred`` and ``eval`` at the last round.


class Pipeline:
    """The declaration of one config (after its recipe), with every stage's key."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        cfg = ctx.cfg
        decls = list(STAGES)
        if cfg.method.name in RECIPES:
            decls = RECIPES.get(cfg.method.name)(decls, cfg)
        decls = with_refiner_stages(decls, cfg)
        decls = self_train.declare_rounds(decls, cfg)
        self.decls = {d.name: d for d in decls if d.enabled(cfg)}
        self._keys: dict[str, str] = {}

    @property
    def order(self) -> list[str]:
        return list(self.decls)

    def inputs(self, name: str) -> tuple[str, ...]:
        return self.decls[name].input_names(self.ctx.cfg)

    def key(self, name: str) -> str:
        if name not in self._keys:
            d = self.decls[name]
            self._keys[name] = config_hash(name, [self.key(i) for i in self.inputs(name)], d.settings(self.ctx.cfg))
        return self._keys[name]

    def keys(self) -> dict[str, str]:
        return {n: self.key(n) for n in self.order if self.decls[n].cached}

    def stage(self, name: str) -> Stage:
        return Stage(self.ctx.layout.root, name, self.key(name))

    def done(self, name: str) -> bool:
        """Stage ``name``'s variant is complete and holds what this config asks of it (a maps variant may hold
        fewer splits than ``maps.splits`` now lists: it is then extended, not recomputed)."""
        d, stage = self.decls[name], self.stage(name)
        return stage.complete and (d.covers is None or d.covers(self.ctx, stage))

    def plan(self, target: str | None = None) -> list[str]:
        """``target`` (default: the last stage) and the stages it needs, in declaration order. A stage complete under
        its key needs nothing before it: its inputs are neither recomputed nor required to be there."""
        target = target or self.order[-1]
        if target not in self.decls:
            raise KeyError(f"stage '{target}' is not part of this run's pipeline ({', '.join(self.order)})")
        need: set[str] = set()

        def visit(n: str) -> None:
            if n in need:
                return
            need.add(n)
            if self.decls[n].cached and self.done(n):
                return
            for i in self.inputs(n):
                visit(i)

        visit(target)
        return [n for n in self.order if n in need]

    def _todo(self, target: str | None) -> tuple[list[str], list[str]]:
        """The stages :meth:`run` visits, and those of them it computes."""
        names = self.plan(target)
        return names, [n for n in names if not self.decls[n].cached or not self.done(n)]

    def run(self, target: str | None = None) -> dict[str, Any]:
        """Run ``target`` (default: every stage) and its inputs; returns each stage's Stage (or value, uncached).

        Under ``torchrun`` (:mod:`wsss.engine.shard`) every process runs this: rank 0 decides what to compute, holds
        the lock and writes the records; every process computes each cached stage (trainings as one DDP job, per-image
        stages on their share of the images); the uncached evaluation runs on rank 0 and its result is sent to all."""
        ctx = self.ctx
        shard.init()
        main = shard.is_main()
        # rank 0 reads the run directory before anything in it is written and the others follow its plan
        names, todo = shard.from_main(self._todo(target) if main else None)
        if any(self.decls[n].cached for n in todo):
            check_splits(ctx.reader, used_splits(ctx.cfg))
        for n in todo:  # every check before anything is trained, written or deleted
            if self.decls[n].check is not None:
                self.decls[n].check(ctx)
        results: dict[str, Any] = {}
        took: list[str] = []
        with RunLock(ctx.layout.lock) if main else contextlib.nullcontext():
            if main:
                dump_config(ctx.cfg, ctx.layout.config)
            for n in names:
                d = self.decls[n]
                if not d.cached:  # evaluation: reads (the records of) every complete stage before it
                    done = {m: self.stage(m) for m in self.order[: self.order.index(n)] if self.decls[m].cached}
                    t0 = time.perf_counter()
                    value = d.compute(ctx, {**{m: s for m, s in done.items() if s.complete}, **results}, None) \
                        if main else None
                    results[n] = shard.from_main(value)
                    took.append(f"{n} {time.perf_counter() - t0:.1f} s")
                    continue
                stage = self.stage(n)
                if shard.from_main(self.done(n) if main else None):
                    if main:
                        stage.activate()
                    log.info("%s: reusing %s (computed earlier with these settings)", n, stage.dir)
                    results[n] = stage
                    took.append(f"{n} reused")
                    continue
                inputs = {i: results[i] for i in self.inputs(n)}
                resumed = shard.from_main(stage.open() if main else None)  # the others start once it is open
                if resumed:
                    log.info("%s: resuming the unfinished work in %s", n, stage.dir)
                t0 = time.perf_counter()
                info = d.compute(ctx, inputs, stage) or {}
                seconds = round(time.perf_counter() - t0, 1)
                shard.barrier()  # every process's files are written
                if main:
                    extra = {"processes": shard.world()} if shard.world() > 1 else {}
                    stage.finish(**info, **extra, resumed=resumed, stage_seconds=seconds)
                shard.barrier()  # the record is written before a later stage reads it
                log.info("%s: done in %.1f s -> %s", n, seconds, stage.dir)
                results[n] = stage
                took.append(f"{n} {seconds:.1f} s{' (resumed)' if resumed else ''}")
        if len(took) > 1:
            log.info("stages: %s", ", ".join(took))
        return results


def run(ctx: RunContext, target: str | None = None) -> dict[str, Any]:
    """``wsss run`` (every stage) or ``wsss <stage>`` (that stage and what it needs)."""
    return Pipeline(ctx).run(target)


def run_stage(ctx: RunContext, name: str) -> Any:
    """Stage ``name`` of ``ctx``'s pipeline, computed (with what it needs) unless complete: its Stage, or the value
    of an uncached stage (evaluation: the metrics)."""
    return run(ctx, name)[name]


__all__ = ["STAGES", "Pipeline", "run", "run_stage", "used_splits", "with_refiner_stages"]
