"""Affinity random walk against the dense CRF: pseudo masks of the training split with ``[crf]``, ``[irn]``,
``[irn, crf]``, ``[psa]``, ``[psa, crf]``, from one run's classifier and maps.

    .venv/bin/python benchmarks/affinity.py --config configs/msrc21.yaml --name msrc21-cam [key=value ...]

Everything goes through the normal pipeline, each step a child process: ``wsss maps`` (the run's classifier and
maps: reused when complete under the config's keys, made otherwise), then each affinity refiner's training stage
alone (``irn``, ``psa``: cached stages, so a rerun reuses them), then ``wsss pseudo`` with each chain. The
``key=value`` overrides go to every step (options of refiners outside a chain are ignored by it, so
``pseudo.options.irn.*`` and ``pseudo.options.psa.*`` can be given once).

- Thresholds: the pseudo stage chooses what the chain leaves open on ``eval.select_on`` (val) -- for a dataset with
  a background class the background threshold, on the maps as the chain's first mask-giving refiner sees them (the
  walked maps for ``[irn]``); the choice is in the table. MSRC-21 has no background class: arg-max over the image's
  classes, nothing to choose.
- Scores: the written pseudo masks of the train split against ground truth, one confusion matrix: mIoU,
  class-average and pixel accuracy.
- Costs: the affinity network's training seconds per epoch (its stage record; blank when the stage was reused
  from an earlier invocation), its confident regions (fraction of pixels, accuracy against ground truth), the walk's
  images/s (network + affinities + walk + upsampling, per image, over the selection and pseudo splits), the pseudo
  stage's images/s, and the peak resident memory of each child (``os.wait4``: on Linux the largest single process
  of the step, the main one or a worker), the CUDA peak when the walk ran on a GPU.

Writes ``<out>/affinity.json``, ``affinity.md`` and one log per step (default out: benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from wsss.bench.methods import _execute, _failure_reason, _machine
from wsss.config import load_config
from wsss.layout import PSEUDO
from wsss.stages import pipeline
from wsss.stages.context import RunContext
from wsss.stages.evaluate import score_mask_folder

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
CHAINS = ("crf", "irn", "irn,crf", "psa", "psa,crf")
AFFINITY = ("irn", "psa")


def chain_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def overrides_for(args, chain: list[str] | None = None) -> list[str]:
    out = [f"name={args.name}", "runtime.progress=false", *args.overrides]
    if chain is not None:
        out.append(f"pseudo.refiners=[{', '.join(chain)}]")
    return out


def pipeline_of(args, chain: list[str]) -> pipeline.Pipeline:
    return pipeline.Pipeline(RunContext(load_config(args.config, overrides_for(args, chain))))


def train_stage(args) -> None:
    """Child mode: the training stage of one affinity refiner, and what it needs."""
    pipeline.run(RunContext(load_config(args.config, overrides_for(args, [args.stage]))), args.stage)


def step(args, what: str, cmd: list[str]) -> dict[str, Any]:
    log = Path(args.out) / "logs" / f"{args.name}-{what}.log"
    echo = (lambda line: print(line, flush=True)) if args.show_logs else None
    rc, seconds, rss = _execute(cmd, log, echo)
    out = {"step": what, "returncode": rc, "seconds": round(seconds, 1), "peak_rss_mb": rss, "log": str(log)}
    if rc != 0:
        out["error"] = _failure_reason(rc, log)
    print(f"{what}: {'ok' if rc == 0 else out['error']} ({seconds:.0f} s, peak RSS {rss:.0f} MB)", flush=True)
    return out


def score_chain(args, chain: list[str]) -> dict[str, Any]:
    p = pipeline_of(args, chain)
    ctx = p.ctx
    stage = p.stage(PSEUDO)
    if not stage.complete:
        raise RuntimeError(f"pseudo stage of {chain} is not complete under {stage.dir}")
    info = stage.info()
    split = info["split"]
    scores = score_mask_folder(ctx, stage.dir / split, split)
    row: dict[str, Any] = {
        "chain": chain, "split": split, "miou": scores["miou"], "class_avg_acc": scores["class_avg_acc"],
        "pixel_acc": scores["pixel_acc"], "per_class_iou": {k: v["iou"] for k, v in scores["per_class"].items()},
        "bg_threshold": info.get("bg_threshold"), "chosen_on": info.get("chosen_on") or info.get("reason"),
        "pseudo_images_per_s": info.get("images_per_s"), "pseudo_key": stage.key,
    }
    for name in chain:
        if name in AFFINITY:
            trained = p.stage(name).info()
            row["affinity"] = {
                "refiner": name, "key": trained.get("key"), "epochs": trained.get("epochs"),
                "seconds_per_epoch": trained.get("seconds_per_epoch"), "final_loss": trained.get("final_loss"),
                "confident_fraction": trained.get("confident_fraction"),
                "confident_accuracy": trained.get("confident_accuracy"),
                "walk_images_per_s": info.get(f"{name}_walk_images_per_s"),
                "walk_images": info.get(f"{name}_walk_images"), "device": info.get(f"{name}_device"),
                "cuda_peak_mb": info.get(f"{name}_cuda_peak_mb"),
                "options": ctx.cfg.pseudo.options.get(name)}
    return row


def cell(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(out: dict) -> str:
    head = (f"Run `{out['run']}` ({out['config']}), dataset {out['dataset']}, maps `{out['maps_key']}`, seed "
            f"{out['seed']}; thresholds chosen on {out['selection_split']}, masks scored on {out['reported_split']}. "
            f"Overrides: {' '.join(out['overrides']) or 'none'}.\n\n")
    rows = ["| chain | bg threshold (chosen on) | train mIoU | class-avg acc | pixel acc | affinity train s/epoch "
            "(epochs) | confident px % (acc %) | walk img/s | pseudo img/s | peak RSS MB train / pseudo | CUDA MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if r.get("error"):
            rows.append(f"| [{', '.join(r['chain'])}] | failed: {r['error']} |" + " |" * 9)
            continue
        a = r.get("affinity") or {}
        train_rss = out["training"].get(a.get("refiner"), {}).get("peak_rss_mb") if a else None
        conf = (f"{100 * a['confident_fraction']:.1f} ({cell(a.get('confident_accuracy'))})"
                if a.get("confident_fraction") is not None else "–")
        bg = "–" if r["bg_threshold"] is None else f"{r['bg_threshold']} ({r['chosen_on']})"
        rows.append(
            f"| [{', '.join(r['chain'])}] | {bg} | {cell(r['miou'])} | {cell(r['class_avg_acc'])} | "
            f"{cell(r['pixel_acc'])} | {cell(a.get('seconds_per_epoch'))} ({cell(a.get('epochs'))}) | {conf} | "
            f"{cell(a.get('walk_images_per_s'), 2)} | {cell(r['pseudo_images_per_s'], 2)} | "
            f"{cell(train_rss, 0)} / {cell(r['run']['peak_rss_mb'], 0)} | {cell(a.get('cuda_peak_mb'), 0)} |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "msrc21.yaml"))
    p.add_argument("--name", required=True, help="run name: the classifier and maps are this run's (made if missing)")
    p.add_argument("--chains", default=";".join(CHAINS), help="';'-separated chains, e.g. 'crf;irn,crf'")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--show-logs", action="store_true", help="echo every step's output")
    p.add_argument("--stage", choices=AFFINITY, help=argparse.SUPPRESS)  # child mode: one training stage
    p.add_argument("overrides", nargs="*", help="key=value overrides for every step")
    args = p.parse_args(argv)
    if args.stage:
        train_stage(args)
        return None
    chains = [chain_list(c) for c in args.chains.split(";") if c.strip()]
    for chain in chains:  # every chain's config is valid before anything runs
        pipeline_of(args, chain)
    python, cli = sys.executable, [sys.executable, "-m", "wsss.cli"]
    t0 = time.perf_counter()
    maps = step(args, "maps", [*cli, "maps", args.config, *overrides_for(args)])
    if maps["returncode"] != 0:
        sys.exit(f"maps failed: {maps['error']} (log {maps['log']})")
    training: dict[str, Any] = {}
    for name in AFFINITY:
        if any(name in c for c in chains):
            training[name] = step(args, f"train-{name}", [python, __file__, "--config", args.config, "--name",
                                                          args.name, "--stage", name, *args.overrides])
    rows = []
    for chain in chains:
        if any(training.get(n, {}).get("returncode") for n in chain):
            rows.append({"chain": chain, "error": "its affinity training failed"})
            continue
        run = step(args, f"pseudo-{'-'.join(chain)}", [*cli, "pseudo", args.config, *overrides_for(args, chain)])
        if run["returncode"] != 0:
            rows.append({"chain": chain, "error": run["error"], "run": run})
            continue
        row = {**score_chain(args, chain), "run": run}
        rows.append(row)
        print(f"  [{', '.join(chain)}]: train mIoU {row['miou']}", flush=True)
    ctx = pipeline_of(args, chains[0]).ctx
    cfg = ctx.cfg
    out = {"run": args.name, "config": args.config, "overrides": list(args.overrides), "dataset": ctx.spec.name,
           "seed": cfg.seed, "maps_key": pipeline_of(args, chains[0]).key("maps"),
           "selection_split": ctx.split_name(cfg.eval.select_on), "reported_split": ctx.split_name(cfg.pseudo.split),
           "crf": {k: v for k, v in vars(cfg.crf).items()}, "maps_step": maps, "training": training, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1), "machine": _machine()}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "affinity.json").write_text(json.dumps(out, indent=1) + "\n")
    (dest / "affinity.md").write_text(markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
