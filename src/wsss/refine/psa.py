"""PSA's AffinityNet as the refiner ``psa``: a feature head trained from relation labels; the affinity of two pixels
is ``exp(-|f_i - f_j|)`` of their features; the maps, with a background map, walk on it.

Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision for Weakly Supervised Semantic
Segmentation", CVPR 2018 (official code: jiwoon-ahn/psa). What every affinity refiner shares -- confident regions,
relation labels, loss, the training stage, the sparse walk -- is in :mod:`wsss.refine.affinity`,
:mod:`wsss.refine.relations` and :mod:`wsss.refine.random_walk`; this module says what PSA adds.

PSA's settings are the defaults (``pseudo.options.psa``):

- confident regions (datasets with background): background scores ``(1 - max_c map)^alpha`` with ``alpha_low`` 4
  (a strong background: its foreground is confident) and ``alpha_high`` 32 (a weak one: its background is
  confident);
- pairs closer than ``radius`` 5 at ``feature_stride`` 8, for the relation labels and for the walk (``label_radius``
  5);
- the head: each feature level through a 1x1 convolution and ELU (widths 64, 128, 256 from the shallowest level;
  He initialisation), upsampled to the stride-8 grid, concatenated, and a square 1x1 convolution with ELU (Xavier
  initialisation, gain 4); the affinity is ``exp(-mean_c |f_i - f_j|)``, the mean over channels as in PSA's code
  (the paper writes the L1 norm; the sum over 448 channels would make every initial affinity vanish);
- training: 8 epochs, batch 8, crops of 448 (no rescale) with flips, SGD at lr 0.1 x 10 for the new layers (the
  only ones that train here), momentum 0.9, weight decay 5e-4, poly decay 0.9;
- the walk: ``beta`` 8, ``steps`` 256 (PSA: logt 8); with a background class the maps walk with a background map
  ``(1 - max_c map)^alpha``, ``alpha`` 16, and PSA's mask is the arg-max of the walked background and classes.
  The refiner gives maps, so that the threshold rule (or a CRF after it) makes the mask: class ``c`` leaves the walk
  as ``walked_c / (walked_c + walked_background)``. With ``pseudo.bg_threshold: 0.5`` the mask is exactly PSA's
  arg-max; another threshold ``t`` weighs the walked background by ``t / (1 - t)`` (the role PSA gives ``alpha``),
  and null chooses it on val. Without a background class the walked maps are divided by their maximum over all
  classes.

What changes, and when:

- Backbone: frozen (PSA fine-tunes ResNet-38 except its first blocks), the run's classifier by default. The levels
  are the last backbone stage at each stride from 8 on (MobileNetV2 OS16: blocks 6 and 18; PSA: ResNet-38's b4, b5
  and bn7 at stride 8, a network without stride 16). Colour jitter is not applied.
- No background class (MSRC-21): confident regions by the margin rule (``margin`` 0.25, see
  :mod:`wsss.refine.relations`), no background map in the walk; ``alpha*`` are unused.
- Small images: a 448 crop of MSRC-21's 320 x 213 images is mostly padding (no pairs there); set
  ``pseudo.options.psa.train.crop_size: 320``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ScheduleConfig, bounded
from wsss.errors import ConfigError
from wsss.refine.affinity import CLASSIFIER, AffinityRefiner, check_backbone_option, resize
from wsss.refine.base import REFINERS
from wsss.refine.random_walk import Offset, pair_inside


@dataclass
class PsaOptions:
    #: frozen backbone of the feature head: "classifier" (the run's trained classifier) or a registered CNN backbone
    #: name (ImageNet weights, output stride 16)
    backbone: str = CLASSIFIER
    #: stride of the head's output grid (PSA: 8)
    feature_stride: Literal[4, 8, 16] = 8
    #: the walk: pairs closer than this (grid pixels), exponent of the affinities, number of steps
    radius: int = bounded(5, ge=2)
    beta: float = bounded(8.0, gt=0)
    steps: int = bounded(256, ge=1)
    #: the walk's background map (datasets with background): (1 - max_c map) ** alpha
    alpha: float = bounded(16.0, gt=0)
    #: relation labels: pairs closer than this (grid pixels)
    label_radius: int = bounded(5, ge=2)
    #: confident regions with a background class: (1 - max_c map) ** alpha_low is the strong background score (its
    #: foreground is confident), ** alpha_high the weak one (its background is confident)
    alpha_low: float = bounded(4.0, gt=0)
    alpha_high: float = bounded(32.0, gt=0)
    #: confident regions without a background class: lead of the best class over the runner-up
    margin: float = bounded(0.25, gt=0, lt=1)
    #: the head's training (PSA's schedule; the backbone is frozen, so only lr * head_lr_mult is used)
    train: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        epochs=8, batch_size=8, lr=0.1, head_lr_mult=10.0, momentum=0.9, weight_decay=5e-4, poly_power=0.9,
        crop_size=448, scale_range=(1.0, 1.0), hflip=True))

    def __post_init__(self):
        check_backbone_option(self.backbone, "pseudo.options.psa.backbone")
        if not self.alpha_low < self.alpha_high:
            raise ConfigError(f"pseudo.options.psa.alpha_low: must be below pseudo.options.psa.alpha_high, got "
                              f"{self.alpha_low} and {self.alpha_high}")


def feature_affinity(features: torch.Tensor, offsets: Sequence[Offset]) -> torch.Tensor:
    """``(B, D, h, w)`` features -> ``(B, K, h, w)``: ``exp(-mean_c |f(y, x) - f(y + dy, x + dx)|)``; 0 for a pair
    leaving the image."""
    h, w = features.shape[-2:]
    pad = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)
    p = F.pad(features, (pad, pad, pad, pad))
    out = [torch.exp(-(features - p[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]).abs().mean(1))
           for dy, dx in offsets]
    return torch.stack(out, dim=1) * pair_inside(h, w, offsets, features.device)


class FeatureHead(nn.Module):
    """AffinityNet's head on feature levels of ``channels``: ``{"features": (B, D, h, w)}``."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        n = len(channels)
        widths = [max(64, 256 >> (n - 1 - i)) for i in range(n)]  # PSA: 64, 128, 256, deepest widest
        self.levels = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(channels, widths))
        self.mix = nn.Conv2d(sum(widths), sum(widths), 1, bias=False)
        for conv in self.levels:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.mix.weight, gain=4)

    def forward(self, features: Sequence[torch.Tensor], grid: Sequence[int]) -> dict[str, torch.Tensor]:
        x = torch.cat([resize(F.elu(conv(f)), grid) for conv, f in zip(self.levels, features)], dim=1)
        return {"features": F.elu(self.mix(x))}


@REFINERS.register("psa")
class AffinityNetRefiner(AffinityRefiner):
    name = "psa"
    Options = PsaOptions
    walk_options = ("radius", "beta", "steps", "alpha")

    def build_head(self, channels: Sequence[int]) -> nn.Module:
        return FeatureHead(channels)

    def pair_affinity(self, out, offsets):
        return feature_affinity(out["features"].float(), offsets)

    def background_scores(self, maps: np.ndarray):
        rest = 1.0 - np.asarray(maps, np.float32).max(0)
        return rest ** self.options.alpha_low, rest ** self.options.alpha_high

    def walk(self, maps, out, half):
        scores = maps
        if self.background:
            scores = torch.cat([(1.0 - maps.amax(0, keepdim=True)).clamp_min(0.0) ** self.options.alpha, maps])
        walked = self.propagate(self.grid_scores(scores, half), half, maps.shape[-2:])
        if self.background:
            fg = walked[1:]
            return fg / (fg + walked[:1]).clamp_min(1e-12)
        return walked / walked.max().clamp_min(1e-12)


__all__ = ["AffinityNetRefiner", "FeatureHead", "PsaOptions", "feature_affinity"]
