"""What a run directory holds, and removing what its latest config does not use: ``wsss runs`` and ``wsss gc``.

Every stage keeps each variant (one per settings hash) in ``<run>/store/<stage>/<key>/`` (wsss.runs.Stage), so a
researcher can switch settings back and forth, or add the fully supervised upper bound next to a weak run, without
recomputing. The price is disk: :func:`inventory` lists every variant with its size and whether the run's latest
config (``<run>/config.yaml``) uses it; :func:`collect` removes the others, except a variant holding a file wsss did
not write, which is kept and named.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from wsss.errors import WsssError
from wsss.layout import RunLayout
from wsss.runs import RunLock, folder_size, foreign_entries, read_meta

log = logging.getLogger("wsss.store")


@dataclass
class Variant:
    stage: str
    key: str
    path: Path
    complete: bool
    bytes: int
    current: bool  # <run>/<stage> links to it
    used: bool | None  # the latest config's key for that stage (None: the latest config could not be read)
    foreign: list[str]


def latest_keys(run_dir: Path) -> tuple[dict[str, str] | None, str | None]:
    """{stage: key} of the run's latest config (``config.yaml``), or (None, why) when it cannot be read."""
    layout = RunLayout(run_dir)
    if not layout.config.exists():
        return None, f"{layout.config} does not exist"
    try:
        from wsss.config import load_config
        from wsss.stages.context import RunContext
        from wsss.stages.pipeline import Pipeline

        return Pipeline(RunContext(load_config(layout.config))).keys(), None
    except WsssError as e:
        return None, f"its config no longer loads ({e})"


def inventory(run_dir: Path) -> tuple[list[Variant], str | None]:
    """Every variant of every stage of a run, and why the latest config's use is unknown (None when known)."""
    layout = RunLayout(run_dir)
    keys, why = latest_keys(run_dir)
    out = []
    if not layout.store.is_dir():
        return out, why
    for stage_dir in sorted(p for p in layout.store.iterdir() if p.is_dir()):
        link = layout.root / stage_dir.name
        current = Path(os.readlink(link)).name if link.is_symlink() else None
        for v in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            meta = read_meta(v)
            out.append(Variant(stage_dir.name, v.name, v, bool(meta.get("complete")) and meta.get("key") == v.name,
                               folder_size(v), v.name == current,
                               None if keys is None else keys.get(stage_dir.name) == v.name, foreign_entries(v)))
    return out, why


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def describe(run_dir: Path) -> str:
    """``wsss runs``: a table of the run's variants and of its kept evaluations."""
    variants, why = inventory(run_dir)
    layout = RunLayout(run_dir)
    lines = [f"{run_dir}: {len(variants)} stage variant(s), {human(sum(v.bytes for v in variants))}"]
    if why:
        lines.append(f"  (which variants the latest config uses is unknown: {why})")
    lines.append(f"  {'stage':<12} {'variant':<17} {'status':<10} {'size':>9}  used by latest config")
    for v in variants:
        status = "complete" if v.complete else "unfinished"
        used = "?" if v.used is None else ("yes" if v.used else "no")
        extra = f"  (holds files wsss did not write: {', '.join(v.foreign[:3])})" if v.foreign else ""
        lines.append(f"  {v.stage:<12} {v.key:<17} {status:<10} {human(v.bytes):>9}  {used}"
                     f"{'  <- current' if v.current else ''}{extra}")
    evals = sorted((layout.root / "metrics").glob("*.json")) if (layout.root / "metrics").is_dir() else []
    if evals:
        lines.append(f"  evaluations kept ({layout.root / 'metrics'}):")
        for path in evals:
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            parts = [f"pseudo {m['pseudo']['miou']}" if m.get("pseudo") else None,
                     f"seg net on {m['seg']['split']} {m['seg']['miou']} ({m['seg'].get('masks')} masks)"
                     if m.get("seg") else None]
            lines.append(f"    {path.stem}: " + ", ".join(p for p in parts if p) + "  stages " +
                         " ".join(f"{n}={k}" for n, k in (m.get("stage_keys") or {}).items()))
    return "\n".join(lines)


def collect(run_dir: Path, yes: bool = False, ask=input) -> tuple[list[Variant], list[Variant]]:
    """``wsss gc``: remove the variants the run's latest config does not use. Asks first unless ``yes``; a variant
    holding a file wsss did not write is kept. Returns (removed, kept because of foreign files)."""
    run_dir = Path(run_dir)
    with RunLock(RunLayout(run_dir).lock):
        variants, why = inventory(run_dir)
        if why:
            raise WsssError(f"wsss gc: {run_dir}: cannot tell which variants the latest config uses ({why}); nothing "
                            "was removed. Rerun the run with a loadable config first")
        unused = [v for v in variants if not v.used and not v.current]
        protected = [v for v in unused if v.foreign]
        todo = [v for v in unused if not v.foreign]
        if not todo:
            return [], protected
        print(f"{len(todo)} variant(s) not used by the latest config of {run_dir} ({human(sum(v.bytes for v in todo))}):")
        for v in todo:
            print(f"  {v.stage}/{v.key}  {human(v.bytes)}")
        if not yes:
            try:
                answer = ask("remove them? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing removed")
                return [], protected
        for v in todo:
            shutil.rmtree(v.path)
        return todo, protected


__all__ = ["Variant", "collect", "describe", "inventory", "latest_keys"]
