"""``onnx``: a salient-object detection network exported to ONNX (U2-Net, BASNet, PoolNet, ...), run with
onnxruntime on the CPU.

This is how WSSS methods that use saliency get it in practice (Oh et al., CVPR 2017 used DeepLab-based saliency
trained on MSRA; later work uses PoolNet / DSS trained on DUTS): a network trained with pixel labels of *class-
agnostic* salient objects. Which network, and whether its pixel supervision is acceptable for a benchmark, is the
user's call; we only run the file given in ``saliency.onnx_path``.

The model must take one float input (1, 3, H, W) -- RGB scaled to [0, 1], then ``(x - onnx_mean) / onnx_std`` --
and give a float output (1, 1, h, w) or (1, h, w) (any h, w: it is resized to the image bilinearly). ``onnx_size``
is the (H, W) the image is resized to; null uses the model's own fixed size. A model that does not fit is reported
once, when the source is built, with the expected and the actual shapes (dynamic dimensions are checked again on
the first real output). ``onnx_output`` says how the raw output becomes [0, 1]: ``probability`` (already one,
clipped), ``logit`` (sigmoid), ``minmax`` (per image, as U2-Net's ``normPRED``).

The named sources ``u2net`` / ``u2netp`` (:mod:`wsss.saliency.u2net`) are this source with a model file fetched and
checked by its sha256, and U²-Net's own preprocessing. Maps are stored per image in the saliency cache and read back
by later runs (``saliency.cache_maps``, :mod:`wsss.saliency.cache`), keyed by the sha256 of the model file and the
settings above. One image per run of the model: batching would need a dynamic batch dimension, which the U²-Net files
do not have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from wsss.errors import ConfigError
from wsss.saliency.base import SALIENCY_SOURCES, SaliencySource
from wsss.saliency.classical import resize
from wsss.saliency.fetch import sha256_file

EXPECTED = "input (1, 3, H, W) float and output (1, 1, H, W) or (1, H, W) float"


def _dims(shape) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def _fixed(d) -> bool:
    return isinstance(d, int) and d > 0


@SALIENCY_SOURCES.register("onnx")
class OnnxSaliency(SaliencySource):
    options = ("onnx_path", "onnx_size", "onnx_mean", "onnx_std", "onnx_output", "onnx_output_name")
    stores_maps = True
    #: how the uint8 RGB image becomes [0, 1] before ``(x - mean) / std``: "255" (divided by 255) or "max" (the
    #: resized image divided by its own maximum, as U²-Net's ToTensorLab)
    divide_by: str = "255"

    @classmethod
    def check_settings(cls, cfg) -> None:
        if not cfg.onnx_path:
            raise ConfigError("saliency.onnx_path: the onnx saliency source needs a model file (an ONNX salient-object "
                              "network); set saliency.onnx_path, or use source spectral_residual / frequency_tuned / "
                              "u2net / u2netp")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_settings(cfg)
        path = Path(cfg.onnx_path)
        if not path.is_file():
            raise ConfigError(f"saliency.onnx_path: {path} does not exist")
        self.open(path, "saliency.onnx_path", cfg.onnx_size, cfg.onnx_mean, cfg.onnx_std, cfg.onnx_output,
                  cfg.onnx_output_name)

    def open(self, path: Path, key: str, size, mean, std, output: str, output_name: str | None) -> None:
        """Load the model file ``path`` and check that it fits; ``key`` names the setting that chose the file in the
        messages; the rest are the ``saliency.onnx_*`` settings (or a named source's own)."""
        self.path, self.key = path, key
        std_values, std = std, np.asarray(std, np.float32)
        if not (np.isfinite(std).all() and (std > 0).all()):
            raise ConfigError(f"saliency.onnx_std: every value must be > 0, got {list(std_values)}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: the checks below say what is wrong in our words
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable / invalid graphs
            raise ConfigError(f"{key}: {path} is not a loadable ONNX model: {e}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = [o.name for o in outputs]
        if output_name is not None and output_name not in names:
            raise ConfigError(f"saliency.onnx_output_name: {path} has no output '{output_name}'; its outputs: "
                              f"{', '.join(names)}")
        self.input = inputs[0] if inputs else None
        self.output = next((o for o in outputs if o.name == output_name), outputs[0] if outputs else None)
        if len(inputs) != 1 or not self._input_fits() or self.output is None or not self._output_fits(self.output.shape):
            raise self._shape_error()
        in_hw = tuple(self.input.shape[2:])
        if size is None:
            if not all(_fixed(d) for d in in_hw):
                raise ConfigError(f"saliency.onnx_size: {path} has a dynamic input size {_dims(self.input.shape)}; "
                                  "set saliency.onnx_size: [height, width]")
            self.size = (int(in_hw[0]), int(in_hw[1]))
        else:
            self.size = (int(size[0]), int(size[1]))
            if min(self.size) < 1:
                raise ConfigError(f"saliency.onnx_size: must be two positive integers, got {list(size)}")
            clash = [f"{n} {want} (model: {d})" for n, want, d in zip(("height", "width"), self.size, in_hw)
                     if _fixed(d) and d != want]
            if clash:
                raise ConfigError(f"saliency.onnx_size: {path} takes a fixed input {_dims(self.input.shape)}; "
                                  f"the configured size differs in {', '.join(clash)}")
        self.mean = np.asarray(mean, np.float32)
        self.std = std
        self.output_mode = output
        self._sha256: str | None = None

    # -- shape checks ---------------------------------------------------------------------------------------------
    #: what the model must take and give, for the messages
    expected: str = EXPECTED

    def _input_fits(self) -> bool:
        s = self.input.shape
        return (self.input.type == "tensor(float)" and len(s) == 4 and s[1] == 3
                and not (isinstance(s[0], int) and s[0] != 1))

    def _output_fits(self, shape) -> bool:
        if self.output.type != "tensor(float)" or len(shape) not in (3, 4):
            return False
        lead = shape[:-2]  # (1,) or (1, 1)
        return all(not isinstance(d, int) or d == 1 for d in lead)

    def _shape_error(self, actual_output=None) -> ConfigError:
        ins = "; ".join(f"'{i.name}' {_dims(i.shape)} {i.type}" for i in self.session.get_inputs()) or "none"
        outs = "; ".join(f"'{o.name}' {_dims(o.shape)} {o.type}" for o in self.session.get_outputs()) or "none"
        got = f" (this run gave output shape {tuple(actual_output)})" if actual_output is not None else ""
        which = f" (using output '{self.output.name}')" if self.output is not None and len(self.session.get_outputs()) > 1 else ""
        return ConfigError(f"{self.key}: {self.path} does not fit a saliency model: expected {self.expected}; the "
                           f"model has input(s) {ins} and output(s) {outs}{which}{got}")

    # -- inference ------------------------------------------------------------------------------------------------
    @classmethod
    def fingerprint(cls, cfg) -> dict:
        try:
            st = os.stat(cfg.onnx_path)
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except (OSError, TypeError):
            return {"missing": True}

    @property
    def sha256(self) -> str:
        """The model file's sha256 (read once, when the first map is stored or looked up)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def identity(self) -> dict:
        return {"model_sha256": self.sha256, "size": list(self.size), "divide_by": self.divide_by,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "output": self.output_mode,
                "output_name": self.output.name}

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> the model's input, (1, 3, H, W) float32 at :attr:`size`."""
        if self.divide_by == "max":
            x = resize(image.astype(np.float32), self.size)
            top = float(x.max())
            x = x / top if top > 0 else x  # a black image stays black (U²-Net's code divides by zero)
        else:
            x = resize(image.astype(np.float32) / 255.0, self.size)
        return ((x - self.mean) / self.std).transpose(2, 0, 1)[None].astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's raw (h, w) output for the input ``x``."""
        out = np.asarray(self.session.run([self.output.name], {self.input.name: x})[0])
        if out.ndim not in (3, 4) or any(d != 1 for d in out.shape[:-2]) or min(out.shape[-2:]) < 1:
            raise self._shape_error(out.shape)
        return out.reshape(out.shape[-2:]).astype(np.float32)

    def compute(self, image: np.ndarray, sample: Any) -> np.ndarray:
        h, w = image.shape[:2]
        out = self.forward(self.preprocess(image))
        mode = self.output_mode
        if mode == "logit":
            out = 1.0 / (1.0 + np.exp(-out))
        elif mode == "minmax":
            lo, hi = float(out.min()), float(out.max())
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        elif out.size and (out.min() < -1e-3 or out.max() > 1 + 1e-3):
            # clipping logits to [0, 1] would silently give a near-binary map at threshold 0
            raise ConfigError(f"saliency.onnx_output: {self.path} gave values in [{out.min():.3g}, {out.max():.3g}], "
                              "not probabilities; set saliency.onnx_output to logit (sigmoid) or minmax")
        out = np.clip(out, 0.0, 1.0)
        return np.clip(resize(out, (h, w)), 0.0, 1.0)
