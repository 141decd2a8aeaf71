"""``wsss segment RUN_DIR INPUT... --out DIR``: a finished run's segmentation network on image files.

INPUT: image files, folders (searched recursively; the output keeps each file's path relative to the folder) or glob
patterns. For an input ``a/b.jpg`` the outputs are

    DIR/b.png            palette PNG of class indices, in the run's palette (``wsss.api.Run.classes`` names them)
    DIR/b.overlay.jpg    with ``overlay``: the photo with the mask's colours blended over it
    DIR/b.probs.npz      with ``probs``: ``probs`` (C, H, W) float16 softmax and ``classes`` (C,) names

at the image's own size. Images are batched by size on the run's inference device, in the run's precision (bf16
autocast) and memory format, as ``wsss predict`` does (:func:`wsss.stages.seg.predict_tensor`, which also predicts
very large images downscaled and upscales back, with a warning). Every file is written atomically and an image whose
outputs are all there is skipped, so a rerun after a kill or an error only does what is missing; ``segment.json``
in DIR records the network and settings, and a rerun with another network into the same DIR is refused rather than
mixing masks. An image that cannot be read is reported with its error after the others are done.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.api import Run
from wsss.data.datasets import InferenceDataset, loader_workers
from wsss.data.io import image_size, save_mask_png
from wsss.data.readers import Sample
from wsss.engine import shard
from wsss.errors import DataError
from wsss.runs import atomic_path, atomic_write_bytes, atomic_write_json
from wsss.seg.sec import images_uint8
from wsss.stages import maps as maps_stage
from wsss.stages import seg as seg_stage

log = logging.getLogger("wsss.segment")

#: file name endings searched for in an input folder (an explicitly named file is read whatever its name)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
#: the record of what made the outputs of a folder
RECORD = "segment.json"
#: weight of the mask's colours in the overlays
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class Job:
    """One input image and the stem of its outputs (relative to the output folder)."""

    source: Path
    name: str

    def outputs(self, out: Path, overlay: bool, probs: bool) -> dict[str, Path]:
        kinds = {"mask": ".png", "overlay": ".overlay.jpg", "probs": ".probs.npz"}
        wanted = {"mask": True, "overlay": overlay, "probs": probs}
        return {k: out / f"{self.name}{suffix}" for k, suffix in kinds.items() if wanted[k]}


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def collect_inputs(inputs: list[str], out: Path) -> tuple[list[Job], list[str]]:
    """The images named by ``inputs`` (files, folders, globs) and an error per input that names nothing. Files under
    ``out`` are never inputs (a rerun must not segment its own masks). Two different files with one output name are
    refused before anything runs."""
    out = out.resolve()
    jobs: list[Job] = []
    errors: list[str] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith(".") and not _inside(p.resolve(), out))
            jobs += [Job(p, p.relative_to(path).with_suffix("").as_posix()) for p in found]
            if not found:
                errors.append(f"{text}: folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            jobs.append(Job(path, path.stem))
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            jobs += [Job(p, p.stem) for p in found if not _inside(p.resolve(), out)]
            if not found:
                errors.append(f"{text}: no file matches")
        else:
            errors.append(f"{text}: no such file or folder")
    by_name: dict[str, list[Path]] = {}
    unique: list[Job] = []
    for job in jobs:
        sources = by_name.setdefault(job.name, [])
        if all(job.source.resolve() != s.resolve() for s in sources):
            sources.append(job.source)
            unique.append(job)
    clashes = {name: srcs for name, srcs in by_name.items() if len(srcs) > 1}
    if clashes:
        listed = "; ".join(f"{name}: {', '.join(map(str, srcs))}" for name, srcs in list(clashes.items())[:5])
        raise DataError(f"{len(clashes)} output name(s) would be written by two images ({listed}); segment them into "
                        "separate --out folders")
    return unique, errors


def check_record(run: Run, out: Path) -> None:
    """``out/segment.json``: written on first use; a folder filled by another network or other settings is refused."""
    cfg = run.cfg
    record = {"run": str(run.run_dir.resolve()), "network": f"{run.seg_stage_name}/{run.seg_dir.name}",
              "classes": list(run.classes), "scales": list(cfg.seg.scales), "flip": cfg.seg.flip}
    path = out / RECORD
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        differs = [k for k in ("network", "classes", "scales", "flip") if old.get(k) != record[k]]
        if differs:
            raise DataError(f"{out} holds the outputs of another network or settings ({', '.join(differs)} differ: "
                            f"{path} says {', '.join(f'{k}={old.get(k)!r}' for k in differs)}); give another --out folder")
        return
    atomic_write_json(path, record)


def overlay_jpeg(rgb: np.ndarray, mask: np.ndarray, palette: bytes, alpha: float = OVERLAY_ALPHA) -> bytes:
    colours = np.frombuffer(palette, np.uint8).reshape(256, 3)[mask]
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Batches of equal-sized images (:func:`wsss.stages.maps.size_batches`), cut so that no batch holds more than
    :data:`wsss.stages.seg.MAX_PREDICT_PIXELS` pixels (a batch of large photos would not fit memory)."""
    out = []
    for batch in maps_stage.size_batches(samples, range(len(samples)), batch_size):
        try:
            h, w = image_size(samples[batch[0]].image)
        except DataError:
            h = w = 1
        n = max(1, min(batch_size, seg_stage.MAX_PREDICT_PIXELS // (h * w)))
        out += [batch[i : i + n] for i in range(0, len(batch), n)]
    return out


def segment_files(run: Run, inputs: list[str], out: str | Path, overlay: bool = False, probs: bool = False,
                  batch_size: int | None = None, progress: bool | None = None) -> dict:
    """Segment the images of ``inputs`` into ``out`` (see the module docstring). Returns counts, the time, images/s
    and ``errors`` (one message per input or image that could not be read); raises only for what stops everything
    (no image at all, clashing names, another network's folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a folder")
    jobs, errors = collect_inputs(inputs, out)
    if not jobs:
        raise DataError("no image to segment:\n  " + "\n  ".join(errors))
    input_errors = len(errors)
    shard.init()  # under torchrun: each process segments its share of the images, on the GPU of its LOCAL_RANK
    model, device, cfg = run.segmenter, run.device, run.cfg
    out.mkdir(parents=True, exist_ok=True)
    if shard.is_main():
        check_record(run, out)
    shard.barrier()
    # rank 0 says what is left before any output is written; each process then segments its share of the batches
    # one process would form, so that every output equals one process's
    todo = [j for j in jobs if not all(p.is_file() for p in j.outputs(out, overlay, probs).values())] \
        if shard.is_main() else None
    todo = shard.from_main(todo)
    samples = [Sample(id=j.name, image=j.source, mask=None) for j in todo]
    batches = shard.shard(_batches(samples, batch_size or cfg.maps.batch_size))
    mine = sum(map(len, batches))
    loader = DataLoader(maps_stage.SafeItems(InferenceDataset(samples, run.spec)), batch_sampler=batches,
                        num_workers=loader_workers(cfg.data.workers), collate_fn=maps_stage.collate_with_errors)
    palette = run.spec.palette_bytes()
    classes = np.array(run.classes)
    t0 = time.perf_counter()
    done = downscaled = 0
    bar = tqdm(total=mine, desc="segment", unit="img", disable=None if progress is None else not progress,
               mininterval=1.0)
    for item in loader:
        errors += item["errors"]
        bar.update(len(item["errors"]))
        batch = item["batch"]
        if batch is None:
            continue
        p, was_downscaled = seg_stage.predict_tensor(model, batch["image"].to(device), cfg.seg.scales, cfg.seg.flip,
                                                     cfg.runtime, "segment", batch["id"])
        p = p.cpu()
        masks = p.argmax(1).to(torch.uint8).numpy()
        photos = images_uint8(batch["image"]) if overlay else None  # the normalisation undone: no second decode
        for b, i in enumerate(batch["index"]):
            paths = todo[i].outputs(out, overlay, probs)
            if probs and not paths["probs"].is_file():
                with atomic_path(paths["probs"], suffix=".npz") as tmp, open(tmp, "wb") as f:
                    np.savez_compressed(f, probs=p[b].numpy().astype(np.float16), classes=classes)
            if overlay and not paths["overlay"].is_file():
                atomic_write_bytes(paths["overlay"], overlay_jpeg(photos[b], masks[b], palette))
            if not paths["mask"].is_file():
                save_mask_png(paths["mask"], masks[b], palette)
        done += len(batch["id"])
        downscaled += len(batch["id"]) if was_downscaled else 0
        bar.update(len(batch["id"]))
    bar.close()
    # every process's files are written; the inputs' errors are every process's, the images' each its own
    everyone = shard.gather((done, downscaled, errors[input_errors:]))
    done, downscaled = (sum(x[i] for x in everyone) for i in range(2))
    errors = errors[:input_errors] + [e for x in everyone for e in x[2]]
    seconds = time.perf_counter() - t0
    return {"images": len(jobs), "written": done, "skipped": len(jobs) - len(todo), "downscaled": downscaled,
            "errors": errors, "seconds": round(seconds, 2), "images_per_s": round(done / max(seconds, 1e-9), 2),
            "device": str(device), "precision": cfg.runtime.precision}


__all__ = ["IMAGE_SUFFIXES", "Job", "collect_inputs", "segment_files"]
