"""The vocabulary of the pipeline's declaration (wsss.stages.pipeline): a stage, how its key is selected from the
config, and the registry of multi-round recipes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wsss.config.schema import Config
from wsss.config.typed import to_dict
from wsss.registry import Registry
from wsss.runs import Stage

#: settings that never change an output; left out of every key
NOT_IN_KEYS = ("data.workers", "runtime.progress", "maps.batch_size", "crf.workers")

Selector = Sequence[str] | Callable[[Config], Any]


@dataclass(frozen=True)
class StageDecl:
    """One stage of the pipeline.

    ``compute(ctx, inputs, stage) -> info``: writes the stage's outputs into ``stage.dir`` reading the complete
    stages ``inputs`` (by name); ``info`` goes into ``stage.json``. ``inputs``: names of earlier stages (or a
    function of the config). ``keyed_by``: dotted config paths (``"-path"`` drops a field of a section taken
    before) or a function of the config returning the settings. ``check(ctx)``: raises before anything runs when the
    stage could not succeed. ``cached=False``: computed on every run, no folder, ``inputs`` holds every stage run
    before it (evaluation). ``covers(ctx, stage)``: whether a complete variant holds everything this config asks of
    it (default: always); when not, the variant is reopened and ``compute`` adds what is missing."""

    name: str
    compute: Callable[[Any, dict, Stage | None], Any]
    inputs: Sequence[str] | Callable[[Config], Sequence[str]] = ()
    keyed_by: Selector = ()
    check: Callable[[Any], None] | None = None
    enabled: Callable[[Config], bool] = lambda cfg: True
    cached: bool = True
    covers: Callable[[Any, Stage], bool] | None = None

    def input_names(self, cfg: Config) -> tuple[str, ...]:
        return tuple(self.inputs(cfg) if callable(self.inputs) else self.inputs)

    def settings(self, cfg: Config) -> Any:
        return self.keyed_by(cfg) if callable(self.keyed_by) else select(cfg, self.keyed_by)


def select(cfg: Config, paths: Sequence[str]) -> dict:
    """``{path: value}`` for each dotted path of ``cfg``; ``"-a.b"`` removes field ``b`` from the section ``a``
    taken earlier. Fields of :data:`NOT_IN_KEYS` are always removed."""
    tree = to_dict(cfg)
    out: dict[str, Any] = {}

    def drop(path: str) -> None:
        head, _, field = path.rpartition(".")
        if head in out and isinstance(out[head], dict):
            out[head].pop(field, None)

    for p in paths:
        if p.startswith("-"):
            drop(p[1:])
            continue
        node: Any = tree
        for part in p.split("."):
            node = node[part]
        out[p] = copy.deepcopy(node)
    for p in NOT_IN_KEYS:
        drop(p)
    return out


#: multi-round recipes by method name: ``recipe(declaration, cfg) -> declaration``
RECIPES: Registry[Callable[[list[StageDecl], Config], list[StageDecl]]] = Registry("multi-round recipe")



__all__ = ["NOT_IN_KEYS", "RECIPES", "StageDecl", "select"]
