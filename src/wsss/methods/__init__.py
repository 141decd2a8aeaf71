"""Classifier-training methods, registered by name (``method.name`` in the config)."""

# importing a method module registers it
from wsss.methods import acol, adv_erase, cam, eps, hide_and_seek, mdc, mix, seam  # noqa: F401
from wsss.methods.base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
