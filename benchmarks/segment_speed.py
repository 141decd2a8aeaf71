"""Images/s of ``wsss segment`` against the prediction stage (``wsss predict``'s compute_predict) on the same images
of a finished run's test split, in bf16 and fp32 (issue 15). Outputs go to a temporary folder; the run is only read.

    .venv/bin/python benchmarks/segment_speed.py RUN_DIR [--images 50] [--repeats 2]

Both time the loop after the network is loaded (loading, decoding, the network, writing the PNGs); each
(path, precision) pair runs ``--repeats`` times in turn and the best is reported (the first pays for kernel set-up).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from wsss.api import Run
from wsss.config import load_config
from wsss.layout import SEG
from wsss.runs import Stage
from wsss.segment import segment_files
from wsss.stages import seg as seg_stage
from wsss.stages.context import RunContext


def predict_path(run: Run, n: int, precision: str, out: Path) -> float:
    cfg = load_config(run.config_path, [f"data.limit={n}", f"runtime.precision={precision}", "runtime.progress=false"])
    ctx = RunContext(cfg)
    stage = Stage(out, "pred", precision)
    stage.dir.mkdir(parents=True)
    return seg_stage.compute_predict(ctx, {SEG: run.network_stage}, stage)["images_per_s"]


def segment_path(run_dir: Path, n: int, precision: str, out: Path) -> float:
    run = Run(run_dir, precision=precision)
    images = [str(s.image) for s in run.ctx.reader.samples(run.ctx.split_name("test"))[:n]]
    return segment_files(run, images, out, progress=False)["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Run(args.run_dir)
    print(f"run {args.run_dir}: network {run.seg_dir}, device {run.device}, {args.images} test images, "
          f"scales {run.cfg.seg.scales}, flip {run.cfg.seg.flip}, loader workers {run.cfg.data.workers}")
    best: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for precision in ("bf16", "fp32"):
                out = Path(tmp) / f"r{r}-{precision}"
                for name, rate in (("wsss predict", predict_path(run, args.images, precision, out / "predict")),
                                   ("wsss segment", segment_path(args.run_dir, args.images, precision, out / "segment"))):
                    print(f"  repeat {r + 1}: {name:13s} {precision}: {rate:6.2f} images/s")
                    best[name, precision] = max(best.get((name, precision), 0.0), rate)
    print("| path | bf16 images/s | fp32 images/s |\n|---|---:|---:|")
    for name in ("wsss predict", "wsss segment"):
        print(f"| {name} | {best[name, 'bf16']:.2f} | {best[name, 'fp32']:.2f} |")


if __name__ == "__main__":
    main()
