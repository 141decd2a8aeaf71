"""Multi-scale + flip inference of localization maps, with explicit aggregation and normalisation.

Each view (scale s, optionally mirrored) is resized, localized, un-mirrored and upsampled to the image size. Views are
combined by ``aggregate`` (sum, mean or max: this choice changes results and is therefore a setting, not a silent
default), then ReLU, then per-class ``normalize``:

- ``max``: m / max(m) -- the WSSS convention (CAM, IRN, PSA); a fixed background threshold keeps its meaning.
- ``minmax``: (m - min) / (max - min) -- what pytorch-grad-cam does; it shifts every threshold.
- ``none``: raw scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from wsss.localize.localizers import Localizer


def normalize_maps(maps: torch.Tensor, mode: str, eps: float = 1e-12) -> torch.Tensor:
    """Per (image, class) normalisation of (B, P, H, W) maps. ``eps`` only guards all-zero maps (which stay zero):
    an additive epsilon would shrink maps of small magnitude, such as Grad-CAM's (CAM / (h w))."""
    if mode == "none":
        return maps
    flat = maps.flatten(2)
    hi = flat.amax(dim=2)[..., None, None]
    if mode == "max":
        return maps / hi.clamp_min(eps)
    if mode == "minmax":
        lo = flat.amin(dim=2)[..., None, None]
        return (maps - lo) / (hi - lo).clamp_min(eps)
    raise ValueError(f"unknown normalisation '{mode}'")


def multiscale_maps(
    model,
    localizer: Localizer,
    images: torch.Tensor,
    class_idx: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    aggregate: str = "sum",
    normalize: str = "max",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, P, H, W) float32 at image resolution, and logits (B, K) of the first view at scale 1 (or the first
    scale). ``images``: normalised (B, 3, H, W) of equal size."""
    b, _, h, w = images.shape
    acc = None
    logits_out = None
    n_views = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False,
                                                  recompute_scale_factor=False)
        idx = class_idx
        if flip:
            x = torch.cat([x, x.flip(-1)])
            idx = torch.cat([class_idx, class_idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps, logits = localizer(model, x, idx)
        maps = F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=False)
        views = [maps[:b], maps[b:].flip(-1)] if flip else [maps]
        if logits_out is None or s == 1.0:
            logits_out = logits[:b].float()
        for v in views:
            n_views += 1
            if acc is None:
                acc = v.clone()
            elif aggregate == "max":
                acc = torch.maximum(acc, v)
            else:
                acc += v
    if aggregate == "mean":
        acc /= n_views
    acc = torch.relu(acc)
    return normalize_maps(acc, normalize), logits_out
