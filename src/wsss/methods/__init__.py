"""Classifier-training methods, registered by name (``method.name`` in the config)."""

from wsss.methods import cam  # noqa: F401  (registers)
from wsss.methods import adv_erase  # noqa: F401  (registers)
from wsss.methods import acol, hide_and_seek, mdc, mix  # noqa: F401  (register)
from wsss.methods import seam  # noqa: F401  (registers)
from wsss.methods.base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
