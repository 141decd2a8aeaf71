"""Localization maps: CAM, Grad-CAM, Grad-CAM++ (one pass for all positive classes), transformer attention and
attention rollout, multi-scale + flip, storage."""

from wsss.localize import attention as _attention  # noqa: F401  (registers attention, rollout)
from wsss.localize.localizers import LOCALIZERS, build_localizer
from wsss.localize.multiscale import multiscale_maps, normalize_maps
from wsss.localize.store import load_maps, save_maps

__all__ = ["LOCALIZERS", "build_localizer", "load_maps", "multiscale_maps", "normalize_maps", "save_maps"]
