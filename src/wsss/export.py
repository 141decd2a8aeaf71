"""``wsss export RUN_DIR --format onnx``: a run's segmentation network and classifier as ONNX files, with dynamic
batch, height and width, checked against torch with onnxruntime.

Files written (into ``<run>/export/`` unless told otherwise):

    segmenter.onnx   input ``image`` (B, 3, H, W) float32 -> ``logits`` (B, C, H, W): the network's class scores at
                     the input size (softmax / argmax over C give the probabilities / the mask)
    classifier.onnx  input ``image`` -> ``logits`` (B, K) image-level scores of the K foreground classes and ``cams``
                     (B, K, h, w) their class activation maps at the feature resolution (raw: ReLU, upsample and
                     divide by the max as ``wsss maps`` does)
    export.json      classes, foreground classes, palette, the input's normalisation, and the check of each file

The input is RGB scaled to [0, 1], then normalised with the ImageNet mean and std (in ``export.json``), as wsss feeds
its own networks. Exported in fp32 with torch's TorchScript-based exporter (``dynamo=False``), which needs the ``onnx``
package but not ``onnxscript`` (``pip install 'wsss[export]'``). Each file is run with onnxruntime at two input
sizes other than the traced one and compared with torch: the largest absolute difference is recorded and printed,
and a file over :data:`TOLERANCE` (relative to the largest output) is reported as failed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsss.api import Run
from wsss.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from wsss.errors import ConfigError, DataError
from wsss.runs import atomic_path, atomic_write_json
from wsss.stages import maps as maps_stage
from wsss.stages import seg as seg_stage

log = logging.getLogger("wsss.export")

FORMATS = ("onnx",)
#: ONNX opset of the exported graphs (onnxruntime >= 1.17 runs it)
OPSET = 17
#: the size the graph is traced at, and the sizes the check runs at (height, width): not multiples of each other, odd
TRACE_HW = (224, 288)
CHECK_HW = ((160, 224), (193, 257))
#: largest accepted |onnxruntime - torch| over the largest |torch| output (float32 kernels differ in summation order)
TOLERANCE = 1e-4


class SegmenterOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["logits"]


class ClassifierOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        return out["logits"], out["cams"]


def _onnx_export(module: nn.Module, path: Path, outputs: dict[str, dict[int, str]]) -> None:
    try:
        import onnx  # noqa: F401  (the TorchScript-based exporter writes through it)
    except ImportError:
        raise ConfigError("wsss export needs the onnx package: pip install 'wsss[export]' (or onnx>=1.15)") from None
    example = torch.zeros(1, 3, *TRACE_HW)
    dims = {"image": {0: "batch", 2: "height", 3: "width"}, **outputs}
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        # the exporter's deprecation notice, and the tracer noting GroupNorm's batch-size check: the result is
        # checked against torch below instead
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=["image"],
                          output_names=list(outputs), dynamic_axes=dims, opset_version=OPSET)


def compare_with_torch(module: nn.Module, path: Path, sizes=CHECK_HW, seed: int = 0) -> dict:
    """Run ``path`` with onnxruntime and ``module`` with torch on the same random inputs of each size (batches of 2,
    then 1): the largest absolute difference over every output and size, and the largest absolute torch output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    diff = scale = 0.0
    for i, (h, w) in enumerate(sizes):
        x = torch.randn(2 if i == 0 else 1, 3, h, w, generator=g)
        with torch.no_grad():
            ref = module(x)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = session.run(None, {"image": x.numpy()})
        for r, o in zip(ref, got, strict=True):
            if tuple(r.shape) != o.shape:
                raise DataError(f"{path}: onnxruntime gives shape {o.shape} where torch gives {tuple(r.shape)} at {h}x{w}")
            diff = max(diff, float(np.abs(r.numpy() - o).max()))
            scale = max(scale, float(r.abs().max()))
    return {"max_abs_diff": diff, "max_abs_output": scale, "sizes": [list(s) for s in sizes],
            "ok": diff <= TOLERANCE * scale}


def export_run(run: Run, out: str | Path | None = None, fmt: str = "onnx") -> dict:
    """Export the run's segmentation network and classifier (those it has; one at least) into ``out``; returns
    what ``export.json`` records."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: supported formats are {', '.join(FORMATS)}")
    if not run.has_segmenter and not run.has_classifier:
        run.seg_dir  # noqa: B018  (raises, naming the command that trains the network)
    out = Path(out) if out is not None else run.run_dir / "export"
    spec = run.spec
    record: dict = {"format": fmt, "run": str(run.run_dir.resolve()), "opset": OPSET, "torch": torch.__version__,
                    "classes": list(spec.classes), "foreground_classes": list(spec.fg_names),
                    "palette": [list(c) for c in spec.palette[: spec.num_classes]],
                    "input": {"name": "image", "layout": "(B, 3, H, W) float32, RGB in [0, 1] then (x - mean) / std",
                              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                    "files": {}}
    stages = []
    if run.has_segmenter:
        model = seg_stage.load_segmenter(run.ctx, run.network_stage)
        stages.append(("segmenter", run.seg_dir, SegmenterOutputs(model),
                       {"logits": {0: "batch", 2: "height", 3: "width"}}))
    else:
        log.warning("%s: no segmentation network; exporting the classifier alone", run.run_dir)
    if run.has_classifier:
        model = maps_stage.load_classifier(run.ctx, run.cls_dir / "model.pt")
        stages.append(("classifier", run.cls_dir, ClassifierOutputs(model),
                       {"logits": {0: "batch"}, "cams": {0: "batch", 2: "cam_height", 3: "cam_width"}}))
    else:
        log.warning("%s: no classifier; exporting the segmentation network alone", run.run_dir)
    for name, source, module, outputs in stages:
        path = out / f"{name}.onnx"
        module = module.float().eval()
        _onnx_export(module, path, outputs)
        check = compare_with_torch(module, path)
        record["files"][path.name] = {"from": str(source / "model.pt"), "outputs": list(outputs), "check": check}
    atomic_write_json(out / "export.json", record)
    return {**record, "out": str(out)}


__all__ = ["TOLERANCE", "compare_with_torch", "export_run"]
