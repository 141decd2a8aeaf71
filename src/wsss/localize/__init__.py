"""Localization maps: CAM, Grad-CAM, Grad-CAM++ (one pass for all positive classes), multi-scale + flip, storage."""

from wsss.localize.localizers import LOCALIZERS, build_localizer
from wsss.localize.multiscale import multiscale_maps, normalize_maps
from wsss.localize.store import load_maps, save_maps

__all__ = ["LOCALIZERS", "build_localizer", "load_maps", "multiscale_maps", "normalize_maps", "save_maps"]
