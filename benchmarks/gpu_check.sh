#!/usr/bin/env bash
# GPU check (issue 15, item 5): CUDA is visible, bf16 autocast works and agrees with fp32, then a short pipeline on
# MSRC-21 on the GPU -- 1 classifier epoch, maps of every split, CRF pseudo masks, 1 epoch of the segmentation network,
# prediction of the test split, evaluation -- and `wsss segment` of the test images; images/s per stage as a table.
# About 2-4 minutes on one modern GPU (the CRF runs on the CPU). Fails at once, saying so, where CUDA is absent.
#
#   benchmarks/gpu_check.sh                      # from the repository root or anywhere
#   PYTHON=/path/to/python DATA=/path/to/msrc21 OUT=/some/dir benchmarks/gpu_check.sh
#
# Writes the run under $OUT/gpu-check-runs (default OUT: /tmp/wsss-gpu-check) and the table to $OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then PYTHON=python3; fi
DATA=${DATA:-../shared/data/msrc21}
[ -d "$DATA" ] || DATA=shared/data/msrc21
OUT=${OUT:-/tmp/wsss-gpu-check}
RUNS="$OUT/gpu-check-runs"
NAME=gpu-check

echo "== 1. CUDA and bf16 autocast"
"$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    print(f"gpu_check: CUDA is not available to torch {torch.__version__} (built for CUDA {torch.version.cuda}); "
          "this check needs an NVIDIA GPU and its driver", file=sys.stderr)
    sys.exit(3)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
if not torch.cuda.is_bf16_supported():
    print("gpu_check: this GPU has no bf16; the runs' precision would fall back to fp32", file=sys.stderr)
    sys.exit(4)
conv = torch.nn.Conv2d(64, 64, 3, padding=1).cuda()
x = torch.randn(8, 64, 56, 56, device="cuda")
with torch.no_grad():
    ref = conv(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = conv(x)
rel = float((low.float() - ref).abs().max() / ref.abs().max())
print(f"bf16 autocast: output dtype {low.dtype}, max difference to fp32 {rel:.2e} of the largest output")
if low.dtype != torch.bfloat16 or rel > 0.05:
    print("gpu_check: bf16 autocast does not run in bf16 or disagrees with fp32", file=sys.stderr)
    sys.exit(5)
EOF
if [ ! -f "$DATA/dataset.json" ]; then
  echo "gpu_check: no MSRC-21 at $DATA (set DATA=/path/to/msrc21)" >&2
  exit 2
fi
mkdir -p "$OUT"

echo "== 2. 1-epoch pipeline on MSRC-21 on the GPU (runs in $RUNS/$NAME)"
rm -rf "${RUNS:?}/$NAME"
t0=$(date +%s)
"$PYTHON" -m wsss.cli run configs/msrc21.yaml "data.root=$DATA" "runs_dir=$RUNS" "name=$NAME" \
  runtime.accelerator=cuda runtime.precision=bf16 runtime.progress=false train.epochs=1 seg.train.epochs=1 \
  2>&1 | tee "$OUT/gpu_check_run.log"
echo "pipeline wall time: $(( $(date +%s) - t0 )) s"
grep -h "stages:" "$OUT/gpu_check_run.log" || true

echo "== 3. wsss segment of the test images (bf16, on the GPU)"
mapfile -t TEST_IMAGES < <(sed "s|^|$DATA/JPEGImages/|; s|$|.jpg|" "$DATA/ImageSets/Segmentation/test.txt")
rm -rf "$OUT/segment"
"$PYTHON" -m wsss.cli segment "$RUNS/$NAME" "${TEST_IMAGES[@]}" --out "$OUT/segment" --device cuda --no-progress \
  | tee "$OUT/gpu_check_segment.log"

echo "== 4. images/s per stage"
"$PYTHON" - "$RUNS/$NAME" "$OUT" <<'EOF'
import json
import re
import sys
from pathlib import Path

run, out = Path(sys.argv[1]), Path(sys.argv[2])


def record(stage):
    return json.loads((run / stage / "stage.json").read_text())


rows = []
cls = record("cls")
rows.append(("cls (train, 1 epoch)", cls["images"] * cls["epochs"], cls["train_seconds"]))
splits = record("maps")["splits"].values()
rows.append(("maps (3 scales + flip)", sum(s["computed"] for s in splits), sum(s.get("seconds", 0) for s in splits)))
pseudo = record("pseudo")
rows.append(("pseudo (CRF, CPU)", pseudo["images"], pseudo.get("seconds", pseudo["stage_seconds"])))
seg = record("seg")
rows.append(("seg (train, 1 epoch)", seg["images"] * seg["epochs"], seg["train_seconds"]))
pred = record("pred")
rows.append(("pred (wsss predict)", pred["images"], pred["images"] / max(pred["images_per_s"], 1e-9)))
m = re.search(r"\((\d+) written.*?([\d.]+) images/s", (out / "gpu_check_segment.log").read_text())
if m:
    rows.append(("wsss segment", int(m.group(1)), int(m.group(1)) / float(m.group(2))))
lines = ["| stage | images | seconds | images/s |", "|---|---:|---:|---:|"]
lines += [f"| {name} | {n} | {s:.1f} | {n / max(s, 1e-9):.1f} |" for name, n, s in rows]
table = "\n".join(lines)
print(table)
(out / "gpu_check.md").write_text(table + "\n")
print(f"\n(1 epoch each, so the scores mean nothing; metrics in {run / 'metrics.json'}; table in {out / 'gpu_check.md'})")
EOF
