"""``wsss bench methods``: every classifier-training method under one config, budget and set of seeds, in one table.

Each (method, seed) is an ordinary run, ``<runs_dir>/<prefix>-<method>-s<seed>``, made by ``wsss run`` with the
benchmark's config and overrides plus ``seg.enabled=false`` (the table compares classifiers, maps and pseudo masks)
and ``pseudo.refiners=[crf]`` (pseudo masks after the config's CRF). Only ``method.name``, ``method.options``
(emptied, then filled from the method's own entry of ``--method-overrides``) and ``seed`` differ between the runs,
so every method gets the same backbone, epochs, batch, crop and map settings. The numbers are read back from each run's
``metrics.json`` (written by :mod:`wsss.stages.evaluate`) and stage info files; this module computes nothing but
their mean and spread.

Columns, per method, mean ± sample standard deviation (n - 1) over the seeds whose run finished:

- classifier mAP on the test split (scores stored with the test maps);
- map mIoU on the train split and on the test split (maps turned into masks by the pseudo-mask rule);
- pseudo-mask mIoU on the train split after the dense CRF;
- wall time of training + map extraction (sum of epoch times and of per-split map times, from the stage files, so it
  is the same whether the run was made now or reused; with Adversarial Erasing every round and the mining of maps
  between rounds), seconds per training epoch, and its ratio to ``cam``'s (mean over seeds divided by mean over
  seeds);
- peak resident memory.

Where we differ from the usual WSSS comparison table: papers report one run per method, often with method-specific
budgets and post-processing; here every method shares one config and is reported over several seeds, with its cost.

Why a subprocess per run: peak memory belongs to that run alone (``os.wait4`` returns the child's resource usage;
on Linux its ``ru_maxrss`` is the largest single process of the run -- the main process, or a data-loader or CRF
worker if larger -- not the sum over the tree), and a method that crashes becomes a row's status instead of ending
the benchmark. A run whose ``metrics.json`` carries the stage keys of its current config is read back without
starting a process; a run with some stages done is started and the stage cache reuses those. Memory cannot be read
from stage files, so each run keeps ``bench.json``: the peak over the invocations that worked on its current
classifier (the maximum is what the run needed).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss.config import Config, load_config
from wsss.config.load import parse_override, read_yaml
from wsss.errors import ConfigError, WsssError
from wsss.layout import MAPS, PSEUDO, RunLayout
from wsss.runs import atomic_write_json, atomic_write_text

#: settings the benchmark sets for every run; a per-method override may not change them
FORCED_KEYS = ("name", "seed", "method.name", "seg.enabled", "pseudo.refiners")
#: the method whose time per epoch the others are divided by
BASELINE = "cam"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    digits: int


COLUMNS: tuple[Column, ...] = (
    Column("cls_map_test", "classifier mAP (test)", 1),
    Column("map_miou_train", "map mIoU (train)", 1),
    Column("pseudo_miou_train", "CRF pseudo mIoU (train)", 1),
    Column("map_miou_test", "map mIoU (test)", 1),
    Column("wall_seconds", "wall s (train + maps)", 0),
    Column("epoch_seconds", "s / epoch", 1),
    Column("peak_rss_mb", "peak RSS MB", 0),
)


@dataclass(frozen=True)
class PlannedRun:
    method: str
    seed: int
    name: str
    overrides: tuple[str, ...]


# -- inputs ----------------------------------------------------------------------------------------------------------

def _flatten(tree: Mapping, where: str, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, where, path + ".")
        else:
            # JSON is valid YAML, so the value reads back exactly as written (strings stay strings)
            out.append(f"{path}={json.dumps(value)}")
    return out


def _override_list(entry: Any, where: str) -> list[str]:
    if entry is None:
        return []
    if isinstance(entry, Mapping):
        items = _flatten(entry, where)
    elif isinstance(entry, list) and all(isinstance(e, str) for e in entry):
        items = list(entry)
    else:
        raise ConfigError(f"{where}: expected a list of key=value strings or a mapping of settings, got {entry!r}")
    for text in items:
        try:
            key, _ = parse_override(text)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        dotted = ".".join(key)
        for forced in FORCED_KEYS:
            if dotted == forced or dotted.startswith(forced + ".") or forced.startswith(dotted + "."):
                raise ConfigError(f"{where}: '{dotted}' is set by the benchmark for every run and cannot be "
                                  f"overridden per method (the benchmark sets: {', '.join(FORCED_KEYS)})")
    return items


def load_method_overrides(path: str | Path) -> dict[str, list[str]]:
    """Read ``--method-overrides``: a YAML mapping of method name to a list of ``key=value`` strings or a mapping of
    settings (nested or dotted keys), e.g. ``acol: {method: {options: {threshold: 0.6}}}``."""
    tree = read_yaml(path, "method overrides file")
    return {str(m): _override_list(v, f"{path}: {m}") for m, v in tree.items()}


def _method_list(methods: Sequence[str] | None) -> list[str]:
    from wsss.methods import METHODS

    names = list(dict.fromkeys(methods)) if methods else METHODS.names()
    if not names:
        raise ConfigError("no method to benchmark")
    for n in names:
        METHODS.get(n)  # unknown name -> ConfigError listing the registered ones
    # the baseline first: the ratio column is relative to it
    return sorted(names, key=lambda n: n != BASELINE)


def plan_runs(methods: Sequence[str], seeds: Sequence[int], prefix: str, overrides: Sequence[str],
              method_overrides: Mapping[str, Sequence[str]]) -> list[PlannedRun]:
    """The runs of a benchmark and each run's overrides, in the order they are applied: progress bars off (the
    user's overrides may turn them on), the user's overrides, the method with empty options, the method's own
    overrides, then the settings that identify the run."""
    plan = []
    for method in methods:
        for seed in seeds:
            name = f"{prefix}-{method}-s{seed}"
            ov = ("runtime.progress=false", *overrides, f"method.name={method}", "method.options={}",
                  *method_overrides.get(method, ()), f"name={name}", f"seed={seed}", "seg.enabled=false",
                  "pseudo.refiners=[crf]")
            plan.append(PlannedRun(method, seed, name, ov))
    return plan


# -- one run ---------------------------------------------------------------------------------------------------------

def _maxrss_mb(maxrss: int) -> float:
    # Linux reports KiB, macOS bytes
    return round(maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _execute(cmd: list[str], log_path: Path, echo: Callable[[str], None] | None) -> tuple[int, float, float]:
    """Run ``cmd``, its output into ``log_path`` (and ``echo``); returns exit code, seconds and its peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                if echo is not None:
                    echo("    | " + line.rstrip("\n"))
            proc.stdout.close()
            # wait4, not Popen.wait: it returns this child's own resource usage (RUSAGE_CHILDREN would be the
            # maximum over every child this process ever had)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, _maxrss_mb(usage.ru_maxrss)


def _failure_reason(rc: int, log_path: Path) -> str:
    if rc < 0:
        return f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("wsss: error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit code {rc}: {last}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record_memory(run_dir: Path, classifier_key: str, peak_rss_mb: float, seconds: float, returncode: int) -> float:
    """Add an invocation to ``<run>/bench.json``; returns the peak RSS over the invocations on this classifier."""
    path = RunLayout(run_dir).bench
    rec = _read_json(path) or {}
    if rec.get("classifier_key") != classifier_key:
        rec = {"classifier_key": classifier_key, "invocations": []}
    rec["invocations"].append({"finished": datetime.datetime.now().isoformat(timespec="seconds"),
                               "seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb, "returncode": returncode})
    rec["peak_rss_mb"] = max(i["peak_rss_mb"] for i in rec["invocations"])
    atomic_write_json(path, rec)
    return rec["peak_rss_mb"]


def _get(tree: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _stage_records(metrics: dict, role: str) -> list[dict]:
    return [r for r in (metrics.get("stages") or {}).values() if isinstance(r, dict) and r.get("role") == role]


def run_values(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The table's numbers of one finished run, from its ``metrics.json`` (None where missing), which carries the
    record of every stage the run's pipeline declared.

    Training time is the sum of every epoch of every classifier the run trained (one, or one per round of a multi-round recipe)
    plus, between rounds, the mining of the training split's maps; seconds per epoch divide the epochs' time alone by
    their number, so a multi-round method pays its rounds in wall time, not in time per epoch.
    """
    layout = RunLayout(run_dir)
    m = _read_json(layout.metrics) or {}
    train, test = cfg.data.train_split, cfg.data.test_split
    splits, timing = m.get("splits") or {}, m.get("timing") or {}
    map_seconds = [_get(v, "seconds") for v in (timing.get("maps") or {}).values()]
    maps_s = sum(map_seconds) if map_seconds and None not in map_seconds else None
    classifiers = _stage_records(m, "classifier")
    epochs = sum(r.get("epochs") or 0 for r in classifiers)
    train_s = sum(r["train_seconds"] for r in classifiers) if classifiers and all(
        r.get("train_seconds") is not None for r in classifiers) else None
    mining_s = sum(r.get("stage_seconds") or 0.0 for r in _stage_records(m, "mining"))
    pseudo = m.get("pseudo") or {}
    return {
        "cls_map_test": _get(splits, test, "classifier", "mAP"),
        "map_miou_train": _get(splits, train, "maps", "miou"),
        "pseudo_miou_train": pseudo.get("miou") if pseudo.get("split") == train else None,
        "map_miou_test": _get(splits, test, "maps", "miou"),
        "wall_seconds": train_s + mining_s + maps_s if train_s is not None and maps_s is not None else None,
        "epoch_seconds": train_s / epochs if train_s is not None and epochs else None,
        "train_seconds": train_s,
        "mining_seconds": mining_s,
        "maps_seconds": maps_s,
        "crf_seconds": _get(m, "stages", PSEUDO, "seconds"),
        "epochs": epochs,
        "classifiers": len(classifiers),
    }


def run_rounds(run_dir: Path) -> list[dict]:
    """The per-round records of a multi-round recipe (each round's classifier and mined maps), from metrics.json."""
    stages = _get(_read_json(RunLayout(run_dir).metrics), "stages") or {}
    return [{"stage": n, **{k: v for k, v in r.items() if k != "key"}} for n, r in stages.items()
            if isinstance(r, dict) and r.get("round") is not None]


def _stage_keys(cfg: Config) -> dict[str, str]:
    """The keys of every cached stage of the run's pipeline (with seg.enabled=false: up to the pseudo masks)."""
    from wsss.stages.context import RunContext
    from wsss.stages.pipeline import Pipeline

    return Pipeline(RunContext(cfg)).keys()


def _do_run(run: PlannedRun, config: Path, python: str, log_dir: Path,
            echo_logs: Callable[[str], None] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"method": run.method, "seed": run.seed, "run": run.name, "status": "failed",
                              "source": None, "error": None, "returncode": None, "run_seconds": None}
    try:
        cfg = load_config(config, list(run.overrides))
        keys = _stage_keys(cfg)  # may validate the method's options (e.g. Adversarial Erasing's rounds)
    except Exception as e:  # one run's bad config (or unwritable run folder) is that run's failure, not the bench's
        record["error"] = str(e) if isinstance(e, WsssError) else f"{type(e).__name__}: {e}"
        return record
    from wsss.stages.evaluate import supervision_of

    record["supervision"] = supervision_of(cfg)["pseudo"]  # I, or I+S where a pixel-trained saliency network helped
    run_dir = Path(cfg.runs_dir) / cfg.name
    record["run_dir"] = str(run_dir)
    written = _get(_read_json(RunLayout(run_dir).metrics), "stage_keys") or {}
    done = all(written.get(k) == v for k, v in keys.items())  # metrics.json may record more stages than these
    if done:
        record["source"] = "reused"
        record["peak_rss_mb"] = _get(_read_json(RunLayout(run_dir).bench), "peak_rss_mb")
    else:
        record["source"] = "ran"
        log_path = log_dir / f"{run.name}.log"
        record["log"] = str(log_path)
        cmd = [python, "-m", "wsss.cli", "run", str(config), *run.overrides]
        rc, seconds, rss = _execute(cmd, log_path, echo_logs)
        record.update(returncode=rc, run_seconds=round(seconds, 1))
        # after a run that finished, its own metrics.json names the classifier it made (the child's keys are the
        # truth should this process hold older code than the child imported)
        # the maps key depends on every classifier the run trains: the memory record belongs to those
        maps_key = _get(_read_json(RunLayout(run_dir).metrics), "stage_keys", MAPS) if rc == 0 else None
        record["peak_rss_mb"] = _record_memory(run_dir, maps_key or keys[MAPS], rss, seconds, rc)
        if rc != 0:
            record["error"] = _failure_reason(rc, log_path)
            return record
    record["status"] = "ok"
    record["values"] = {**run_values(run_dir, cfg), "peak_rss_mb": record["peak_rss_mb"]}
    if rounds := run_rounds(run_dir):
        record["rounds"] = rounds
    return record


# -- the table -------------------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of the values that exist; std is None for fewer than two."""
    vals = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": list(values)}


def summarize(methods: Sequence[str], records: Sequence[dict]) -> list[dict]:
    """One row per method: its status, seeds, and mean ± std of every column over the seeds that finished."""
    rows = []
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        ok = [r for r in runs if r["status"] == "ok"]
        status = "ok" if len(ok) == len(runs) else ("failed" if not ok else f"{len(ok)}/{len(runs)} ok")
        rows.append({
            "method": method,
            "status": status,
            "supervision": "/".join(sorted({r["supervision"] for r in runs if r.get("supervision")})) or None,
            "seeds": [r["seed"] for r in runs],
            "seeds_ok": [r["seed"] for r in ok],
            "columns": {c.key: mean_std([r["values"].get(c.key) for r in ok]) for c in COLUMNS},
            "runs": list(runs),
        })
    base = next((r for r in rows if r["method"] == BASELINE), None)
    base_epoch = base["columns"]["epoch_seconds"]["mean"] if base else None
    for row in rows:
        mine = row["columns"]["epoch_seconds"]["mean"]
        row["epoch_ratio_to_cam"] = mine / base_epoch if mine is not None and base_epoch else None
    return rows


def format_stat(stats: dict, digits: int = 1) -> str:
    """A :func:`mean_std` result as ``mean ± std`` (just the mean for one value, ``–`` for none)."""
    if stats["mean"] is None:
        return "–"
    text = f"{stats['mean']:.{digits}f}"
    return text + (f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else "")


def failed_runs(rows: Sequence[dict]) -> list[dict]:
    """The run records of every (method, seed) that did not finish, in table order."""
    return [r for row in rows for r in row["runs"] if r["status"] != "ok"]


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison table in Markdown, failures listed under it."""
    head = ["method", "status", "seeds", *(c.header for c in COLUMNS[:-1]), f"× {BASELINE} (s / epoch)",
            COLUMNS[-1].header, "supervision"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ratio = row["epoch_ratio_to_cam"]
        cells = [row["method"], row["status"], ",".join(map(str, row["seeds_ok"])) or "–",
                 *(format_stat(row["columns"][c.key], c.digits) for c in COLUMNS[:-1]),
                 f"{ratio:.2f}" if ratio is not None else "–", format_stat(row["columns"][COLUMNS[-1].key], 0),
                 row.get("supervision") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    failures = failed_runs(rows)
    if failures:
        lines.append("")
        lines.append("Failed runs:")
        lines += [f"- {r['method']} seed {r['seed']}: {r['error']}" + (f" (log: {r['log']})" if r.get("log") else "")
                  for r in failures]
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        torch_version = None
    return {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or None,
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch_version}


def bench_methods(config: str | Path, methods: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
                  overrides: Sequence[str] = (), method_overrides: Mapping[str, Sequence[str]] | None = None,
                  prefix: str | None = None, out: str | Path | None = None, python: str = sys.executable,
                  echo: Callable[[str], None] | None = print, show_logs: bool = False) -> dict[str, Any]:
    """Train, map and score every method (default: all registered) for every seed, each run in its own process;
    write ``table.md`` and ``table.json`` into ``out`` (default ``<runs_dir>/<prefix>``) and return the JSON.

    ``prefix`` defaults to ``bench-<config file stem>``; runs are ``<runs_dir>/<prefix>-<method>-s<seed>``.
    """
    config = Path(config)
    names = _method_list(methods)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("no seed to benchmark")
    per_method = {m: _override_list(list(v), f"method overrides: {m}") for m, v in (method_overrides or {}).items()}
    from wsss.methods import METHODS

    for m in per_method:
        METHODS.get(m)  # a typo in the overrides file must not silently drop a method's options
    base = load_config(config, list(overrides))  # a bad shared override fails here, before any run
    prefix = prefix or f"bench-{config.stem}"
    out = Path(out) if out is not None else Path(base.runs_dir) / prefix
    plan = plan_runs(names, seeds, prefix, list(overrides), per_method)
    say = echo or (lambda _: None)
    say(f"bench methods: {len(names)} method(s) x {len(seeds)} seed(s) = {len(plan)} runs -> {out}")
    t0 = time.perf_counter()
    records = []
    for i, run in enumerate(plan, 1):
        say(f"[{i}/{len(plan)}] {run.method} seed {run.seed} ({run.name}) ...")
        rec = _do_run(run, config, python, out / "logs", echo if show_logs else None)
        records.append(rec)
        took = f"{rec['run_seconds']:.0f} s" if rec["run_seconds"] is not None else "files reused"
        result = "ok" if rec["status"] == "ok" else f"FAILED: {rec['error']}"
        say(f"[{i}/{len(plan)}] {run.method} seed {run.seed}: {result} ({took}; bench elapsed "
            f"{time.perf_counter() - t0:.0f} s)")
    rows = summarize(names, records)
    table = markdown_table(rows)
    result = {
        "benchmark": "methods",
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": str(config),
        "overrides": list(overrides),
        "method_overrides": per_method,
        "methods": names,
        "seeds": seeds,
        "prefix": prefix,
        "machine": _machine(),
        "columns": {c.key: c.header for c in COLUMNS},
        "notes": "mean ± sample std (n - 1) over the seeds whose run finished; wall = training + map extraction; "
                 f"epoch ratio = mean s/epoch / {BASELINE}'s; peak RSS = largest single process of the run; "
                 "supervision of the pseudo masks: I = image-level labels, I+S = and a saliency network trained with "
                 "pixel masks (compare I+S rows with I rows only as such)",
        "rows": rows,
        "elapsed_seconds": round(time.perf_counter() - t0, 1),
    }
    header = (f"# Method comparison: {config} ({', '.join(overrides) or 'no overrides'})\n\n"
              f"Seeds {', '.join(map(str, seeds))}; {result['notes']}.\n\n")
    atomic_write_text(out / "table.md", header + table + "\n")
    atomic_write_json(out / "table.json", result)
    say(table)
    say(f"table: {out / 'table.md'}  {out / 'table.json'}")
    return result
