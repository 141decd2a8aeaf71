"""A trained run applied to new images from Python: ``wsss.load_run(run_dir)``.

::

    run = wsss.load_run("runs/demo")
    mask = run.segment("photo.jpg")      # HxW uint8, each value an index into run.classes
    heat = run.cam("photo.jpg", "cow")   # HxW float32 in [0, 1]

Everything comes from the run directory: the resolved config (``config.yaml``: preprocessing, scales, flip,
precision, memory format), the segmentation network that ``wsss predict`` uses (stage ``seg``, or the last
self-training round ``seg_r<k>``) and the classifier (stage ``cls``), each the variant the run links to. Image-level
labels are never read. The class names and palette are the run's dataset spec when its dataset is reachable; without
the dataset, the names come from the checkpoint and the palette is the default one (with a warning).

The network and the classifier are the ones :mod:`wsss.stages.seg` and :mod:`wsss.stages.maps` load, and prediction
is :func:`wsss.stages.seg.predict_tensor` (the same downscaling of very large images, autocast and memory format as
``wsss predict``); maps are :func:`wsss.localize.multiscale_maps` with the run's ``maps.*`` settings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from wsss.config import load_config
from wsss.config.runtime import autocast as runtime_autocast
from wsss.config.runtime import resolve_precision
from wsss.data.io import load_image, pil_to_rgb, upright
from wsss.data.readers import open_dataset
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import to_tensor
from wsss.engine.checkpoint import load_checkpoint
from wsss.errors import ConfigError, DataError, WsssError
from wsss.layout import CLS, PRED, SEG, RunLayout
from wsss.localize import build_localizer, multiscale_maps
from wsss.runs import RunLock, Stage
from wsss.stages import maps as maps_stage
from wsss.stages import seg as seg_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline

log = logging.getLogger("wsss.api")

#: what an image argument may be
ImageLike = str | os.PathLike | Image.Image | np.ndarray


def as_rgb(image: ImageLike) -> np.ndarray:
    """A file path, PIL image or HxWx3 (or HxW grey) uint8 array as an HxWx3 uint8 RGB array. A file or PIL image
    with an EXIF orientation tag is turned as viewers show it (as the loaders do), so the mask fits the photo a user
    sees; an array is taken as it is."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(upright(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise DataError(f"expected an HxWx3 (or HxW grey) uint8 array, got {image.dtype} of shape {image.shape}")
        return np.stack([image] * 3, -1) if image.ndim == 2 else image.copy()  # (a copy: torch wants it writable)
    raise DataError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")


class Run:
    """A finished run's networks on new images. ``precision`` (bf16 / fp32) and ``device`` (auto / cpu / cuda)
    override the run's ``runtime.precision`` / ``runtime.accelerator``. Nothing is written into the run.

    The segmentation network and the classifier load on first use; :func:`load_run` loads the network at once so
    that a run without one is refused there."""

    def __init__(self, run_dir: str | os.PathLike, precision: str | None = None, device: str | None = None):
        self.run_dir = Path(run_dir)
        self.config_path = self.run_dir / "config.yaml"
        if not self.config_path.is_file():
            raise DataError(f"{self.run_dir}: no config.yaml, so not a wsss run directory (a run is made by "
                            "`wsss run CONFIG name=NAME` in runs/NAME)")
        overrides = [f"runtime.precision={precision}"] if precision else []
        overrides += [f"runtime.accelerator={device}"] if device else []
        cfg = load_config(self.config_path, overrides)
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device cuda: torch {torch.__version__} sees no CUDA device here (use cpu or auto)")
        if precision is None and cfg.runtime.precision == "bf16":
            # the run recorded the precision of the machine it trained on; here bf16 may be emulated (many times
            # slower on a CPU without bf16 units) or missing (older GPUs)
            native, why = resolve_precision(maps_stage.inference_device(cfg).type)
            if native == "fp32":
                log.warning("the run used bf16, but %s: predicting in fp32 (precision='bf16' forces it)", why)
                cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="fp32"))
        self.cfg = cfg
        pipeline = Pipeline(RunContext(cfg))
        #: the stage of the network ``wsss predict`` reads (``seg``, or the last self-training round)
        self.seg_stage_name = pipeline.inputs(PRED)[0] if PRED in pipeline.order else SEG

    # -- what the run holds ---------------------------------------------------------------------------------------

    def _stage(self, name: str) -> Stage | None:
        """The variant ``<run>/<name>`` links to, when it is complete and holds its model."""
        link = self.run_dir / name
        if not link.is_symlink():
            return None
        stage = Stage(self.run_dir, name, Path(os.readlink(link)).name)
        return stage if stage.complete and (stage.dir / "model.pt").is_file() else None

    def _command(self, cmd: str, *overrides: str) -> str:
        """``wsss <cmd>`` on this run's own config.yaml (which names the run), with ``overrides``."""
        args = [str(self.config_path), *overrides]
        if (Path(self.cfg.runs_dir) / self.cfg.name).resolve() != self.run_dir.resolve():  # the run was moved
            args += [f"runs_dir={self.run_dir.parent}", f"name={self.run_dir.name}"]
        return " ".join(["wsss", cmd, *map(shlex.quote, args)])

    def _missing(self, name: str, what: str, command: str) -> DataError:
        state = "is unfinished" if (self.run_dir / name).exists() else "was never run"
        holder = RunLock.holder(RunLayout(self.run_dir).lock)
        if holder:
            return DataError(f"{self.run_dir} has no {what} yet: its stage '{name}' {state} and a command is working "
                             f"in the run now ({holder}); wait for it to finish")
        return DataError(f"{self.run_dir} has no {what}: its stage '{name}' {state}. Train it with `{command}`; it "
                         "reuses the finished stages of the run")

    @cached_property
    def seg_dir(self) -> Path:
        stage = self._stage(self.seg_stage_name)
        if stage is None:
            enable = () if self.cfg.seg.enabled else ("seg.enabled=true",)
            # the first network is stage 4 alone; the self-training rounds come with the prediction
            cmd = self._command("train-seg" if self.seg_stage_name == SEG else "predict", *enable)
            raise self._missing(self.seg_stage_name, "segmentation network", cmd)
        return stage.dir

    @cached_property
    def cls_dir(self) -> Path:
        stage = self._stage(CLS)
        if stage is None:
            raise self._missing(CLS, "classifier (the maps of .cam come from it)", self._command("train-cls"))
        return stage.dir

    @property
    def has_segmenter(self) -> bool:
        return self._stage(self.seg_stage_name) is not None

    @property
    def has_classifier(self) -> bool:
        return self._stage(CLS) is not None

    @cached_property
    def spec(self) -> DatasetSpec:
        """The run's dataset spec; without its dataset, the checkpoint's class names with the default palette."""
        from_seg = self.has_segmenter
        checkpoint = (self.seg_dir if from_seg else self.cls_dir) / "model.pt"
        classes = load_checkpoint(checkpoint)["meta"]["classes"]  # the classifier's: foreground classes only
        try:
            spec = open_dataset(self.cfg.data).spec
            if list(spec.classes if from_seg else spec.fg_names) == classes:
                return spec
            why = f"its dataset's classes ({', '.join(spec.classes)}) are not the network's"
        except WsssError as e:
            why = f"its dataset is not readable here ({e})"
        log.warning("%s: %s; class names from %s, default palette", self.run_dir, why, checkpoint)
        background = classes.index("background") if from_seg and "background" in classes else None
        return DatasetSpec(name=self.cfg.name, classes=tuple(classes), background=background)

    @property
    def classes(self) -> tuple[str, ...]:
        """Name of each mask value."""
        return self.spec.classes

    @cached_property
    def ctx(self) -> RunContext:
        """What the stages' loaders take: the config and the spec."""
        return RunContext(self.cfg, spec=self.spec)

    @property
    def network_stage(self) -> Stage:
        """The stage variant of the segmentation network."""
        return Stage(self.run_dir, self.seg_stage_name, self.seg_dir.name)

    @cached_property
    def segmenter(self) -> torch.nn.Module:
        """The segmentation network, in eval mode on :attr:`device`."""
        return seg_stage.segmenter_on_device(self.ctx, self.network_stage)[0]

    @cached_property
    def classifier(self) -> torch.nn.Module:
        """The classifier, in eval mode on :attr:`device`."""
        return maps_stage.inference_model(self.ctx, self.cls_dir / "model.pt")

    @cached_property
    def device(self) -> torch.device:
        return maps_stage.inference_device(self.cfg)

    # -- on images -------------------------------------------------------------------------------------------------

    def _tensor(self, image: ImageLike) -> torch.Tensor:
        return to_tensor(as_rgb(image))[None].to(self.device)

    def probs(self, image: ImageLike) -> np.ndarray:
        """Class probabilities (C, H, W) float32 of the segmentation network (the run's ``seg.scales`` / ``seg.flip``)."""
        s = self.cfg.seg
        probs, _ = seg_stage.predict_tensor(self.segmenter, self._tensor(image), s.scales, s.flip, self.cfg.runtime,
                                            "segment")
        return probs[0].cpu().numpy()

    def segment(self, image: ImageLike) -> np.ndarray:
        """The mask (H, W) uint8 of ``image`` (a path, PIL image or HxWx3 uint8 array): class indices into
        :attr:`classes`."""
        return self.probs(image).argmax(0).astype(np.uint8)

    def class_index(self, cls: str | int) -> int:
        """A class name, or a mask value, as a mask value; refused for the background (the classifier has no output
        for it)."""
        spec = self.spec
        if isinstance(cls, str):
            idx = spec.class_index(cls)
        elif isinstance(cls, (int, np.integer)) and not isinstance(cls, bool) and 0 <= cls < spec.num_classes:
            idx = int(cls)
        else:
            raise DataError(f"class {cls!r}: expected a name or an index 0..{spec.num_classes - 1} of "
                            f"{', '.join(spec.classes)}")
        if idx == spec.background:
            raise DataError(f"class '{spec.classes[idx]}' is the background, which the classifier does not score: it "
                            f"has maps for {', '.join(spec.fg_names)}")
        return idx

    def cam(self, image: ImageLike, cls: str | int) -> np.ndarray:
        """The classifier's localization map (H, W) float32 in [0, 1] of class ``cls`` (name or mask value) on
        ``image``: the run's ``maps.localizer``, scales, flip, aggregation and normalisation (``none``: divided by
        its max)."""
        idx = self.class_index(cls)
        m = self.cfg.maps
        model = self.classifier
        x = self._tensor(image)
        h, w = x.shape[-2:]
        x = seg_stage.downscale_to_fit(x, "cam")
        out_idx = torch.tensor([[self.spec.fg_ids.index(idx)]], device=self.device)
        autocast = runtime_autocast(self.device, self.cfg.runtime.precision)
        with autocast:
            maps, _ = multiscale_maps(model, build_localizer(m.localizer, m.target_layer), x, out_idx, m.scales, m.flip,
                                      m.aggregate, "max" if m.normalize == "none" else m.normalize,
                                      channels_last=self.cfg.runtime.channels_last)
        if maps.shape[-2:] != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        return maps[0, 0].clamp(0, 1).cpu().numpy()

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}: {len(self.classes)} classes, network {self.seg_dir})"


def load_run(run_dir: str | os.PathLike, precision: str | None = None, device: str | None = None) -> Run:
    """The finished run ``run_dir`` (``runs/<name>``) with its segmentation network loaded; refused, naming the
    command to run, when the run has none. ``precision`` / ``device``: see :class:`Run`."""
    run = Run(run_dir, precision, device)
    run.segmenter  # noqa: B018  (loads now: a run without a network fails here)
    return run


__all__ = ["Run", "as_rgb", "load_run"]
