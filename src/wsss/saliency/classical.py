"""Classical unsupervised saliency computed here: no model file, no training, a few milliseconds per image.

- ``spectral_residual`` -- Hou & Zhang, "Saliency Detection: A Spectral Residual Approach", CVPR 2007. The log
  amplitude spectrum of natural images is close to its local average; what sticks out of that average (the
  *spectral residual*) belongs to the unexpected parts of the image. The saliency map is the squared magnitude of
  the inverse FFT of ``exp(residual + i * phase)``, smoothed by a Gaussian. As in the authors' reference code: grey
  image resized to width 64, 3x3 average of the log amplitude (replicate border), Gaussian sigma 2.5 (zero border,
  which also damps the wrap-around artefacts of the FFT at the image edge), min-max to [0, 1].
- ``frequency_tuned`` -- Achanta, Hemami, Estrada & Süsstrunk, "Frequency-tuned Salient Region Detection",
  CVPR 2009: the distance, in CIE Lab, of each pixel of a slightly blurred image from the image's mean colour.
  Whole objects (not only their edges) light up where their colour differs from the image's average.

Where we differ: the Gaussian kernel of the spectral residual is truncated at 3 sigma (the reference code uses a
10x10 kernel, about 2 sigma); the map is resized back to the image with bilinear interpolation (the reference code
leaves it at width 64); frequency-tuned maps are divided by their maximum so they span [0, 1] like the other
sources (the paper keeps raw Lab distances). Each source has its own scale, which is why the fusion threshold is
chosen on val per source.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss.errors import ConfigError
from wsss.saliency.base import SALIENCY_SOURCES, SaliencySource

#: ITU-R BT.601 luma weights, as MATLAB's rgb2gray (the reference code of the spectral residual)
GREY = np.array([0.2989, 0.5870, 0.1140], np.float32)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W) or (H, W, C) float array to ``size`` (height, width); antialiased when
    shrinking."""
    if tuple(x.shape[:2]) == tuple(size):
        return np.asarray(x, np.float32)
    # torch only here: the CRF's worker processes import the refiners, and with them this module
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    shrink = size[0] < x.shape[0] or size[1] < x.shape[1]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)[0]
    return np.ascontiguousarray((out[0] if x.ndim == 2 else out.permute(1, 2, 0)).numpy())


def filter_separable(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """Filter the first two axes of ``x`` (H, W[, C]) with the 1D ``kernel`` (odd length) along each; ``pad_mode``
    is numpy's ("constant" = zeros, "edge" = replicate). A weighted sum of shifted views: no Python loop over
    pixels, and much faster on the CPU than a grouped convolution for these small kernels."""
    r = len(kernel) // 2
    for axis in (0, 1):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.moveaxis(np.pad(x, pad, mode=pad_mode), axis, 0)
        x = np.moveaxis(sum(float(k) * xp[i : i + n] for i, k in enumerate(kernel)), 0, axis)
    return x


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-(np.arange(-r, r + 1, dtype=np.float64) ** 2) / (2 * sigma**2))
    return k / k.sum()


def spectral_residual(image: np.ndarray, width: int = 64, sigma: float = 2.5) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of an HxWx3 uint8 RGB image -> (H, W) float32 in
    [0, 1] (min-max normalised; a flat image gives all zeros)."""
    h, w = image.shape[:2]
    grey = (image.astype(np.float32) / 255.0) @ GREY
    small = resize(grey, (max(1, round(h * width / w)), width)).astype(np.float64)
    if np.ptp(small) < 1e-6:
        return np.zeros((h, w), np.float32)  # a flat image has no residual (its spectrum is the DC term alone)
    spectrum = np.fft.fft2(small)
    log_amp = np.log(np.abs(spectrum) + 1e-12)
    padded = np.pad(log_amp, 1, mode="edge")
    sh, sw = log_amp.shape
    local_mean = sum(padded[i : i + sh, j : j + sw] for i in range(3) for j in range(3)) / 9.0
    residual = log_amp - local_mean
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    if sigma > 0:
        sal = filter_separable(sal, gaussian_kernel(sigma), "constant")
    sal = resize(sal, (h, w))
    lo, hi = float(sal.min()), float(sal.max())
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return np.zeros((h, w), np.float32)
    return ((sal - lo) / (hi - lo)).astype(np.float32)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 sRGB -> HxWx3 float32 CIE Lab (D65 white)."""
    rgb = image.astype(np.float32) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]], np.float32)
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    e = (6 / 29) ** 3
    f = np.where(xyz > e, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return lab.astype(np.float32)


def frequency_tuned(image: np.ndarray) -> np.ndarray:
    """Frequency-tuned saliency (Achanta et al., CVPR 2009) of an HxWx3 uint8 RGB image -> (H, W) float32 in
    [0, 1] (divided by the maximum; a flat image gives all zeros)."""
    lab = rgb_to_lab(image)
    blurred = filter_separable(lab, np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0, "edge")
    mean = lab.reshape(-1, 3).mean(0, dtype=np.float64).astype(np.float32)
    sal = np.sqrt(((blurred - mean) ** 2).sum(-1))
    hi = float(sal.max())
    # below 1e-3 Lab units (1 is a just-noticeable difference) the "contrast" is float rounding of a flat image
    return (sal / hi).astype(np.float32) if hi > 1e-3 else np.zeros(sal.shape, np.float32)


@SALIENCY_SOURCES.register("spectral_residual")
class SpectralResidual(SaliencySource):
    options = ("sr_width", "sr_blur_sigma")
    #: a fixed image transform: no pixel labels behind it (figures stay "I", not "I+S")
    pixel_supervised = False

    def __init__(self, cfg):
        super().__init__(cfg)
        if isinstance(cfg.sr_width, bool) or not isinstance(cfg.sr_width, int) or cfg.sr_width < 8:
            raise ConfigError(f"saliency.sr_width: must be an integer >= 8 (Hou & Zhang use 64), got {cfg.sr_width!r}")
        if not np.isfinite(cfg.sr_blur_sigma) or cfg.sr_blur_sigma < 0:
            raise ConfigError(f"saliency.sr_blur_sigma: must be a number >= 0 (0 = no smoothing), "
                              f"got {cfg.sr_blur_sigma!r}")

    def compute(self, image: np.ndarray, sample: Any) -> np.ndarray:
        return spectral_residual(image, self.cfg.sr_width, self.cfg.sr_blur_sigma)


@SALIENCY_SOURCES.register("frequency_tuned")
class FrequencyTuned(SaliencySource):
    pixel_supervised = False

    def compute(self, image: np.ndarray, sample: Any) -> np.ndarray:
        return frequency_tuned(image)
