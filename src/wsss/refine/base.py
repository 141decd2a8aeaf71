"""The refiner interface: localization maps -> refined maps or a pseudo mask, one registered plugin per refinement.

The pseudo stage runs the chain ``pseudo.refiners`` over every image, in order: ``[crf]`` (the dense CRF of the
maps), ``[saliency, crf]`` (saliency fusion, then the CRF of the fused mask), ``[]`` (no refinement). What flows
through the chain is an :class:`Item`: the image's maps, its classes, the original uint8 RGB image (read when a
refiner first asks for it) and, once a refiner has given one, a mask. A refiner that takes maps may give maps (the
next one sees the refined maps) or a mask; maps still left at the end of the chain become a mask by the background
threshold / arg-max rule of :func:`wsss.pseudo.pseudo_mask`, so ``[]`` is that rule alone.

A refiner is a subclass of :class:`Refiner` registered in :data:`REFINERS` (its module imported by
``wsss/refine/__init__.py``) that says only what it adds:

- ``refine(item) -> item``: the refinement of one image;
- ``Options``: a dataclass of its options (``pseudo.options.<name>``), validated at load; an unknown option is a
  :class:`~wsss.errors.ConfigError` naming the key and the refiner's valid options;
- ``takes`` / ``gives``: the kinds of input it accepts (maps, mask) and the kind it gives (None: the kind it was
  given), so that a chain that hands a refiner what it cannot use is refused at load;
- ``sections``: the top-level config sections it reads (the CRF's ``crf`` kernels, which ``seg.crf_postprocess``
  shares); with its options they are what it keys the pseudo stage on (:meth:`Refiner.key`);
- optionally ``check`` (against the dataset, before anything runs), ``prepare`` (build what ``refine`` needs),
  ``workers`` (processes over images), ``chooses`` / ``choose`` (a setting chosen on the selection split),
  ``info`` (what it records) and ``stages`` (see below).

**Stages a refiner needs** (e.g. a network trained on the run's maps, :mod:`wsss.refine.affinity`):
:meth:`Refiner.stages` returns :class:`~wsss.stages.declare.StageDecl` s. The pipeline
(:mod:`wsss.stages.pipeline`) inserts them after ``maps`` and adds their names to the pseudo stage's inputs, so they
are cached, resumable stages with their own keys (their own folder, ``runs/<name>/<stage name>/``, a name unique in
the run), computed before the pseudo stage and checked before anything runs, and the pseudo stage's key includes
theirs. :meth:`Refiner.prepare` receives them, complete, by name, and reads what they wrote from their folders.
Nothing else in the stages knows about them.

:meth:`Refiner.__call__` is the one place that enforces the contract (maps keep their shape, a mask is an image-
sized uint8 array), so a refiner only says how it refines.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from wsss.config.typed import build, to_dict
from wsss.data.io import load_image
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError, DataError
from wsss.pseudo import pseudo_mask
from wsss.registry import Registry

if TYPE_CHECKING:
    from wsss.runs import Stage
    from wsss.stages.declare import StageDecl

#: the kinds of data a refiner takes and gives
MAPS, MASK = "maps", "mask"


@dataclass
class NoOptions:
    pass


@dataclass
class Item:
    """One image on its way through the chain.

    ``maps`` (P, H, W) normalised scores of the mask classes ``classes`` (P,). ``bg_threshold``: the background
    score of a dataset with background (None without background, and while the threshold is being chosen);
    ``ignore_below``: ``pseudo.ignore_below``. ``mask`` (H, W) uint8 once a refiner has given one; ``fixed`` (H, W)
    bool marks pixels whose mask label the refiners after it keep (saliency fusion: zero saliency is background).
    """

    sample: Any
    maps: np.ndarray
    classes: np.ndarray
    spec: DatasetSpec
    bg_threshold: float | None = None
    ignore_below: float | None = None
    mask: np.ndarray | None = None
    fixed: np.ndarray | None = None
    _image: np.ndarray | None = field(default=None, repr=False)

    @property
    def image(self) -> np.ndarray:
        """The original HxWx3 uint8 RGB image, read on first use (in a worker process when the first refiner that
        needs it runs there, so the main process does not read it only to send it)."""
        if self._image is None:
            image = load_image(self.sample.image)
            h, w = self.maps.shape[1:]
            if image.shape[:2] != (h, w):
                raise DataError(f"{self.sample.image}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its maps "
                                f"are {w}x{h}; rerun `wsss maps`")
            self._image = image
        return self._image

    @property
    def kind(self) -> str:
        return MAPS if self.mask is None else MASK

    def replace(self, **changes: Any) -> Item:
        return dataclasses.replace(self, **changes)

    def final_mask(self) -> np.ndarray:
        """The mask the chain gave, or the threshold / arg-max rule of the maps when it gave none."""
        if self.mask is not None:
            return self.mask
        return pseudo_mask(self.maps, self.classes, self.spec, self.bg_threshold, self.ignore_below)


@dataclass
class Selection:
    """The selection split (``eval.select_on``) as a refiner that chooses a setting sees it: iterating gives
    ``(item, ground truth)`` per image, the item as it reaches that refiner (after the refiners before it, with the
    chosen background threshold)."""

    split: str
    spec: DatasetSpec
    #: the candidate thresholds (``eval.sweep``)
    thresholds: list[float]
    items: Callable[[], Iterator[tuple[Item, np.ndarray]]]

    def __iter__(self) -> Iterator[tuple[Item, np.ndarray]]:
        return self.items()


class Refiner:
    """Base class; see the module docstring for what a subclass sets."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    takes: ClassVar[tuple[str, ...]] = (MAPS,)
    gives: ClassVar[str | None] = MAPS
    sections: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: dict[str, Any] | None, cfg: Any, given: str = MAPS):
        """``cfg``: the run's :class:`~wsss.config.schema.Config` (for the shared ``sections``); ``given``: the kind
        of input this refiner gets in its chain."""

        self.cfg = cfg
        self.given = given
        valid = [f.name for f in dataclasses.fields(self.Options)]
        try:
            self.options = build(self.Options, dict(options or {}), f"pseudo.options.{self.name}")
        except ConfigError as e:
            raise ConfigError(f"{e} (refiner '{self.name}' takes: {', '.join(valid) or 'no options'})") from None

    @property
    def output(self) -> str:
        """The kind this refiner gives in its chain."""
        return self.gives or self.given

    def refine(self, x: Item) -> Item:
        raise NotImplementedError

    def check(self, ctx: Any) -> None:
        """Before anything runs (the classifier may take hours): raise :class:`ConfigError` / :class:`DataError`
        when this refiner could not succeed on the run's dataset (``ctx``: the :class:`RunContext`)."""

    def stages(self) -> list[StageDecl]:
        """Cached stages this refiner needs before the pseudo stage (e.g. training a network on the run's maps); see
        the module docstring. Their names must be unique in the run; their inputs are earlier stages (``cls``,
        ``maps``). Default: none."""
        return []

    def prepare(self, ctx: Any, stages: Mapping[str, Stage]) -> None:
        """Build what :meth:`refine` needs (e.g. a saliency model, a trained network), in the process that computes,
        after :meth:`check` has passed. ``stages``: the complete stages of :meth:`stages`, by name."""

    def workers(self) -> int:
        """Worker processes over images from this refiner on (0 = the main process). The refiners from the first
        one with workers to the end of the chain run in the workers, so they must be picklable."""
        return 0

    def chooses(self) -> str | None:
        """The setting this refiner chooses on the selection split (``eval.select_on``) because the config leaves it
        null, e.g. ``"saliency.threshold"``; None when there is nothing to choose."""
        return None

    def choose(self, selection: Selection) -> None:
        """Choose :meth:`chooses`'s setting on the selection split (a :class:`~wsss.evaluation.ThresholdSweep` over
        ``selection.thresholds`` scores any thresholded rule in one pass) and keep it for :meth:`refine`; report it
        in :meth:`info`."""
        raise NotImplementedError

    def info(self) -> dict:
        """What the pseudo stage records about this refiner (after :meth:`prepare` and :meth:`choose`)."""
        return {}

    def key(self) -> dict:
        """The settings that change this refiner's output: its options and the config sections it reads."""

        return {"options": to_dict(self.options), **{s: to_dict(getattr(self.cfg, s)) for s in self.sections}}

    def __call__(self, x: Item) -> Item:
        if x.kind not in self.takes:
            raise ValueError(f"refiner '{self.name}' takes {' or '.join(self.takes)}, got {x.kind}")
        out = self.refine(x)
        h, w = x.maps.shape[1:]
        if not isinstance(out, Item):
            raise TypeError(f"refiner '{self.name}' returned {type(out).__name__}, not an Item")
        gives = self.gives or x.kind
        if out.kind != gives:
            raise ValueError(f"refiner '{self.name}' gives {gives} but returned {out.kind}")
        if gives == MAPS and np.shape(out.maps) != np.shape(x.maps):
            raise ValueError(f"refiner '{self.name}' returned maps of shape {np.shape(out.maps)} for maps of shape "
                             f"{np.shape(x.maps)}")
        if gives == MASK and (out.mask.shape != (h, w) or out.mask.dtype != np.uint8):
            raise ValueError(f"refiner '{self.name}' returned a {out.mask.dtype} mask of shape {out.mask.shape} for "
                             f"{h}x{w} maps; expected ({h}, {w}) uint8")
        return out


REFINERS: Registry[type[Refiner]] = Registry("refiner")


def build_chain(cfg: Any) -> list[Refiner]:
    """The refiners of ``cfg.pseudo.refiners`` in order, with their options from ``cfg.pseudo.options``; raises
    :class:`ConfigError` for an unknown or repeated name, a refiner that cannot take what the one before it gives,
    an option a refiner does not take, or options of a name that is no refiner."""
    names = cfg.pseudo.refiners
    options = cfg.pseudo.options
    if not isinstance(options, dict):
        raise ConfigError(f"pseudo.options: expected a mapping of refiner name -> options, got {options!r}")
    for name in options:
        REFINERS.get(name, key=f"pseudo.options.{name}")
    chain: list[Refiner] = []
    given = MAPS
    for i, name in enumerate(names):
        cls = REFINERS.get(name, key="pseudo.refiners")
        if name in names[:i]:
            raise ConfigError(f"pseudo.refiners: '{name}' appears twice in {list(names)}")
        if given not in cls.takes:
            before = f"'{names[i - 1]}' before it gives a {given}" if i else "the chain starts from maps"
            raise ConfigError(f"pseudo.refiners: '{name}' takes {' or '.join(cls.takes)}, but {before}; reorder "
                              f"{list(names)}")
        opts = options.get(name) or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"pseudo.options.{name}: expected a mapping of options, got {opts!r}")
        chain.append(cls(opts, cfg, given))
        given = chain[-1].output
    return chain


def resolve_refiners(cfg: Any) -> None:
    """Validate ``cfg.pseudo.refiners`` and replace ``cfg.pseudo.options`` by the full options (defaults filled in,
    plain dicts) of every refiner of the chain; options of registered refiners outside the chain are dropped, so a
    chain can be shortened by an override. Raises :class:`ConfigError`. Cheap (builds no model, opens no dataset)
    and idempotent."""

    cfg.pseudo.options = {r.name: to_dict(r.options) for r in build_chain(cfg)}


def refine_many(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """``fn(job)`` for every job, in ``workers`` processes (0 = in this process); results come back in job order.

    ``fn`` must be a module-level function (workers are started with 'spawn', which imports it by name; no forked
    copies of a parent that holds torch threads). At most ``2 * workers`` jobs are in flight, so a lazy ``jobs``
    iterator (e.g. maps loaded one by one) is never read far ahead of the results. A worker's exception is raised
    here when its result is due.
    """
    if workers <= 0:
        for job in jobs:
            yield fn(job)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def through(refiners: Sequence[Refiner], item: Item) -> Item:
    for r in refiners:
        item = r(item)
    return item


def finish_chain(job: tuple[Sequence[Refiner], Item]) -> np.ndarray:
    """Worker entry point (module level, for spawn): the rest of a chain on one item, then its final mask."""
    refiners, item = job
    return through(refiners, item).final_mask()
