"""Benchmark of the spine on MSRC-21: CAM / Grad-CAM / Grad-CAM++ quality on one model, and map-extraction speed.

    .venv/bin/python benchmarks/spine.py quality   # trains (or reuses) the default config, scores each localizer
    .venv/bin/python benchmarks/spine.py speed     # images/s and peak memory, each case in its own process

Writes benchmarks/out/spine-*.json; the figures in benchmarks/RESULTS.md come from these files.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
CONFIG = REPO / "configs" / "msrc21.yaml"
SPEED_MODEL_RUN = "calib"


def quality(args) -> None:
    from wsss.config import load_config
    from wsss.stages.context import RunContext
    from wsss.stages.pipeline import run_stage

    results = {}
    variants = [("cam", ""), ("grad_cam", ""), ("grad_cam_pp", ""), ("grad_cam", "13"), ("grad_cam_pp", "13")]
    for loc, layer in variants:
        overrides = [f"name={args.name}", f"maps.localizer={loc}", f"maps.target_layer={layer!r}" if layer
                     else "maps.target_layer=''", "runtime.progress=false", "pseudo.refiners=[]", "seg.enabled=false",
                     *args.overrides]
        t0 = time.perf_counter()
        m = run_stage(RunContext(load_config(CONFIG, overrides)), "eval")
        key = loc + (f"@{layer}" if layer else "")
        results[key] = {
            "seconds": round(time.perf_counter() - t0, 1),
            **{split: {"map_miou": s["maps"]["miou"], "class_avg_acc": s["maps"]["class_avg_acc"],
                       "mAP": s["classifier"]["mAP"]} for split, s in m["splits"].items()},
            "pseudo_miou": m["pseudo"]["miou"],
            "timing": m["timing"],
        }
        print(key, json.dumps(results[key]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "spine-quality.json").write_text(json.dumps(results, indent=1))


# --- speed: each case runs in a fresh process so that peak RSS belongs to that case alone ---------------------------

def _setup(n_images: int):
    """The trained classifier of the quality run (runs/calib) when present, else an untrained one: speed is the same."""
    import dataclasses

    import torch

    from wsss.config import load_config
    from wsss.data.datasets import InferenceDataset
    from wsss.data.readers import open_dataset
    from wsss.methods import build_method

    torch.set_num_threads(2)
    cfg = load_config(CONFIG, ["runtime.progress=false"])
    reader = open_dataset(cfg.data)
    model = build_method("cam").build_model(dataclasses.replace(cfg.model, pretrained=False), reader.spec.num_fg)
    trained = REPO / "runs" / SPEED_MODEL_RUN / "cls" / "model.pt"
    if trained.exists():
        model.load_state_dict(torch.load(trained, weights_only=True)["model"])
    model.eval()
    ds = InferenceDataset(reader.samples("train")[:n_images], reader.spec)
    return model, [ds[i] for i in range(len(ds))]


def speed_case(case: str, n_images: int) -> dict:
    import torch

    from wsss.localize import build_localizer, multiscale_maps
    from wsss.stages.maps import class_indices

    model, items = _setup(n_images)
    scales = [0.5, 1.0, 1.5]
    n_classes = sum(int(it["labels"].sum()) for it in items)
    bf16 = case.endswith("-bf16")
    name = case.removesuffix("-bf16")
    if name in ("ours-cam", "forward") and bf16:
        model = model.to(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def run_all():
        for it in items:
            x = it["image"][None]
            idx, _ = class_indices(it["labels"][None], None, "gt", 0.5)
            with ctx:
                if name == "forward":  # the plain forward pass at the same views: the floor for any localizer
                    with torch.no_grad():
                        for s in scales:
                            xs = torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear")
                            xs = torch.cat([xs, xs.flip(-1)])
                            if bf16:
                                xs = xs.contiguous(memory_format=torch.channels_last)
                            model(xs)
                elif name == "ours-cam":
                    multiscale_maps(model, build_localizer("cam"), x, idx, scales, True, channels_last=bf16)
                elif name == "ours-gradcam":  # single view, for the comparison with pytorch-grad-cam
                    multiscale_maps(model, build_localizer("grad_cam"), x, idx, [1.0], False)
                elif name == "ours-gradcam-ms":
                    multiscale_maps(model, build_localizer("grad_cam"), x, idx, scales, True)
                elif name == "pytorch-grad-cam":
                    _pgc(model, x, idx[0].tolist())

    run_all_items = items
    items = run_all_items[:2]
    run_all()  # warm-up (allocator, oneDNN kernels)
    items = run_all_items
    t0 = time.perf_counter()
    run_all()
    dt = time.perf_counter() - t0
    return {"case": case, "images": len(items), "classes": n_classes, "seconds": round(dt, 2),
            "images_per_s": round(len(items) / dt, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


_PGC = {}


def _pgc(model, x, classes):
    """pytorch-grad-cam on the same model, image and classes: one call (one backward) per class."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if "cam" not in _PGC:
        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(x)["logits"]

        _PGC["cam"] = GradCAM(model=Logits(model), target_layers=[model.backbone[-1]])
    cam = _PGC["cam"]
    for k in classes:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])


def speed(args) -> None:
    cases = ["forward", "ours-cam", "forward-bf16", "ours-cam-bf16", "ours-gradcam", "pytorch-grad-cam",
             "ours-gradcam-ms"]
    results = []
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "_case", case, str(args.images)], capture_output=True,
                             text=True, cwd=REPO)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        results.append(res)
    by = {r["case"]: r for r in results}
    summary = {
        "cam_vs_forward_fp32": round(by["ours-cam"]["seconds"] / by["forward"]["seconds"], 3),
        "cam_vs_forward_bf16": round(by["ours-cam-bf16"]["seconds"] / by["forward-bf16"]["seconds"], 3),
        "pytorch_grad_cam_over_ours": round(by["pytorch-grad-cam"]["seconds"] / by["ours-gradcam"]["seconds"], 2),
    }
    print(json.dumps(summary))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "spine-speed.json").write_text(json.dumps({"cases": results, "summary": summary}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--name", default="spine-bench")
    q.add_argument("overrides", nargs="*")
    s = sub.add_parser("speed")
    s.add_argument("--images", type=int, default=40)
    c = sub.add_parser("_case")
    c.add_argument("case")
    c.add_argument("images", type=int)
    args = p.parse_args()
    if args.cmd == "quality":
        quality(args)
    elif args.cmd == "speed":
        speed(args)
    else:
        print(json.dumps(speed_case(args.case, args.images)))


if __name__ == "__main__":
    main()
