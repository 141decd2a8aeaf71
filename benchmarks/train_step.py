"""Images/s of one optimiser step of the demo's networks on random tensors (benchmarks/RESULTS.md section 18):
the classifier (MobileNetV2 OS16 + CAM head, multi-label loss) or DeepLabV3 (cross-entropy at full resolution), in
fp32 or bf16 autocast, NCHW or channels_last, at a crop of HEIGHT x WIDTH. Median of the steps after 2 warm-ups.

    .venv/bin/python benchmarks/train_step.py cls bf16 --channels-last --batch 16 --crop 224 320
    .venv/bin/python benchmarks/train_step.py seg bf16 --channels-last --batch 8 --crop 320 320
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/train_step.py cls bf16 ...   # as a CPU without AVX-512
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn import functional as F

from wsss.config.schema import ModelConfig, SegModelConfig
from wsss.models.backbones import build_backbone
from wsss.models.classifier import CAMClassifier
from wsss.seg.model import DeepLabV3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("network", choices=["cls", "seg"])
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, nargs=2, default=(320, 320), metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    classes, (h, w), bs = 21, args.crop, args.batch
    if args.network == "cls":
        model = CAMClassifier(build_backbone(ModelConfig(backbone="mobilenet_v2", output_stride=16)), classes)
    else:
        model = DeepLabV3(SegModelConfig(backbone="mobilenet_v2", output_stride=16), classes)
    model.train()
    x = torch.randn(bs, 3, h, w)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    labels, masks = torch.randint(0, 2, (bs, classes)).float(), torch.randint(0, classes, (bs, h, w))
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        with amp:
            out = model(x)
            loss = (F.multilabel_soft_margin_loss(out["logits"].float(), labels) if args.network == "cls"
                    else F.cross_entropy(out["logits"], masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[2:])
    print(f"{args.network} {args.precision} {'channels_last' if args.channels_last else 'NCHW'} batch {bs} {h}x{w}: "
          f"{step:.3f} s/step, {bs / step:.1f} images/s")


if __name__ == "__main__":
    main()
