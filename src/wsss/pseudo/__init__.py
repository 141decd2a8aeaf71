"""Pseudo masks from localization maps (threshold / arg-max / ignore band)."""

from wsss.pseudo.masks import pseudo_mask

__all__ = ["pseudo_mask"]
