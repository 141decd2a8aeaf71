"""IRN's inter-pixel relations as the refiner ``irn``: a class-boundary branch trained from relation labels; the
affinity of two pixels is 1 - the highest boundary score on the line between them; the maps walk on it.

Ahn, Cho & Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel Relations", CVPR 2019
(official code: jiwoon-ahn/irn). The semantic part only: no displacement field, no instances. What every affinity
refiner shares -- confident regions, relation labels, loss, the training stage, the sparse walk -- is in
:mod:`wsss.refine.affinity`, :mod:`wsss.refine.relations` and :mod:`wsss.refine.random_walk`; this module says what
IRN adds.

IRN's settings are the defaults (``pseudo.options.irn``):

- confident regions (datasets with background): ``conf_fg_threshold`` 0.30 and ``conf_bg_threshold`` 0.05, the
  constant background scores of the strong and the weak CRF;
- relation labels for pairs closer than ``label_radius`` 10 at ``feature_stride`` 4; the walk over pairs closer than
  ``radius`` 5 (IRN trains with radius 10 and walks with radius 5);
- the boundary branch: each feature level through a 1x1 convolution to 32 channels, GroupNorm (4 groups) and ReLU,
  upsampled to the stride-4 grid, concatenated, and a 1x1 convolution to one logit; the boundary probability is its
  sigmoid. Affinity on the path: IRN's path is the pixels of the pair's bounding box closer than 1 to the line
  between them, both ends included (:func:`line_path`);
- training: 3 epochs, batch 32, crops of 512 with rescale 0.5-1.5 and flips, SGD at lr 0.1 (the branch; the
  backbone is frozen, as IRN detaches it), momentum 0.9, weight decay 1e-4, poly decay 0.9;
- the walk: ``beta`` 10, ``steps`` 256 (IRN: exp_times 8). Before it, the maps on the grid are multiplied by
  (1 - boundary), so boundary pixels take their score from inside the regions; at walk time the boundary is the
  sigmoid of the mean logit of the image and its mirror (``flip``, IRN's EdgeDisplacement). The walked maps are
  divided by their maximum over all classes, so IRN's background threshold 0.25 (sem_seg_bg_thres) means what it
  means there: set ``pseudo.bg_threshold: 0.25`` for IRN's rule, or leave it null to choose it on val.

What changes, and when:

- Backbone: the run's classifier (MobileNetV2 here) instead of IRN's ResNet-50; the levels are the last backbone
  stage at each stride from 4 on (MobileNetV2 OS16: blocks 3, 6 and 18 at strides 4, 8, 16; ResNet-50: layer1,
  layer2, layer4 -- IRN also reads the stem and layer3). Stride-16 levels are upsampled to the stride-4 grid like
  IRN's layer3/layer4.
- No background class (MSRC-21): confident regions by the margin rule (``margin`` 0.25, see
  :mod:`wsss.refine.relations`), the positive loss term is the foreground pairs alone, and the walked maps go to the
  arg-max over the image's classes; ``conf_*_threshold`` are unused.
- Small images: MSRC-21's images (about 320 x 213) are smaller than a 512 crop; the padding is unknown (no pairs),
  so the result is the same as with 320 crops but costs more. Set ``pseudo.options.irn.train.crop_size: 320``
  there. With 273 images a batch of 32 makes 8 steps an epoch (VOC's train_aug: 330).
"""

from __future__ import annotations

import functools
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
from wsss.refine.random_walk import Offset


@dataclass
class IrnOptions:
    #: frozen backbone of the boundary branch: "classifier" (the run's trained classifier) or a registered CNN
    #: backbone name (ImageNet weights, output stride 16)
    backbone: str = CLASSIFIER
    #: stride of the branch's output grid (IRN: 4)
    feature_stride: Literal[4, 8, 16] = 4
    #: the walk: pairs closer than this (grid pixels), exponent of the affinities, number of steps
    radius: int = bounded(5, ge=2)
    beta: float = bounded(10.0, gt=0)
    steps: int = bounded(256, ge=1)
    #: at walk time, the boundary of the image and of its mirror averaged (IRN)
    flip: bool = True
    #: relation labels: pairs closer than this (grid pixels)
    label_radius: int = bounded(10, ge=2)
    #: confident regions with a background class: background score of the strong CRF (its foreground is confident)
    #: and of the weak one (its background is confident)
    conf_fg_threshold: float = bounded(0.30, gt=0, lt=1)
    conf_bg_threshold: float = bounded(0.05, gt=0, lt=1)
    #: confident regions without a background class: lead of the best class over the runner-up
    margin: float = bounded(0.25, gt=0, lt=1)
    #: the branch's training (IRN's schedule; the backbone is frozen, so only lr * head_lr_mult is used)
    train: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        epochs=3, batch_size=32, lr=0.1, head_lr_mult=1.0, momentum=0.9, weight_decay=1e-4, poly_power=0.9,
        crop_size=512, scale_range=(0.5, 1.5), hflip=True))

    def __post_init__(self):
        check_backbone_option(self.backbone, "pseudo.options.irn.backbone")
        if not self.conf_bg_threshold < self.conf_fg_threshold:
            raise ConfigError(f"pseudo.options.irn.conf_bg_threshold: must be below pseudo.options.irn.conf_fg_threshold"
                              f", got {self.conf_bg_threshold} and {self.conf_fg_threshold}")


@functools.cache
def line_path(dy: int, dx: int) -> tuple[Offset, ...]:
    """IRN's path from a pixel to its neighbour at ``(dy, dx)``: the offsets of their bounding box whose distance to
    the line between them is below 1, both ends included."""
    n2 = dy * dy + dx * dx
    return tuple((y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
                 if (dy * x - dx * y) ** 2 < n2)


class _PathMax(torch.autograd.Function):
    """The highest boundary probability on each pair's :func:`line_path` (outside the image counts as 1); the
    gradient goes to that pixel (to one of them where several tie, as with IRN's max-pooling).

    Forward: the boundary's windows ``(rows y..y+r, columns x-r..x+r)`` unfolded once, then, per group of offsets
    with equal path length, their path pixels gathered and max-reduced in one op, which also gives the arg-max. On
    CPU, a loop over shifted views (stack + amax, autograd through it) took about 5x as long at IRN's training
    radius (10: 152 pairs per pixel, 2134 path pixels). Backward: one scatter-add of the gradients to the arg-max
    pixels."""

    @staticmethod
    def forward(ctx, boundary: torch.Tensor, offsets: tuple[Offset, ...]) -> torch.Tensor:
        lead, (h, w) = boundary.shape[:-2], boundary.shape[-2:]
        b = boundary.reshape(-1, h, w)
        r = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)  # half offsets: dy >= 0
        side = 2 * r + 1
        windows = F.unfold(F.pad(b[:, None], (r, r, 0, r), value=1.0), kernel_size=(r + 1, side))
        groups: dict[int, list[int]] = {}
        for k, o in enumerate(offsets):
            groups.setdefault(len(line_path(*o)), []).append(k)
        out = b.new_empty(b.shape[0], len(offsets), h * w)
        which = torch.empty(out.shape, dtype=torch.uint8, device=b.device)
        for length, ks in groups.items():
            rows = torch.tensor([y * side + x + r for k in ks for y, x in line_path(*offsets[k])], device=b.device)
            values, at = windows.index_select(1, rows).view(b.shape[0], len(ks), length, h * w).max(2)
            out[:, ks], which[:, ks] = values, at.to(torch.uint8)
        # where each path pixel lies in the padded map, relative to the pair's first pixel
        wp = w + 2 * r
        table = torch.zeros(len(offsets), max(groups, default=1), dtype=torch.long)
        for k, o in enumerate(offsets):
            table[k, : len(line_path(*o))] = torch.tensor([y * wp + x for y, x in line_path(*o)])
        ctx.save_for_backward(which, table.to(b.device))
        ctx.geometry = (lead, h, w, r)
        return out.view(*lead, len(offsets), h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        which, table = ctx.saved_tensors
        lead, h, w, r = ctx.geometry
        k = table.shape[0]
        g = grad.reshape(-1, k, h * w)
        wp = w + 2 * r
        first = (torch.arange(h, device=g.device)[:, None] * wp + torch.arange(w, device=g.device) + r).view(-1)
        at = first + table[torch.arange(k, device=g.device)[:, None], which.long()]
        padded = g.new_zeros(g.shape[0], (h + r) * wp)
        padded.scatter_add_(1, at.view(g.shape[0], -1), g.reshape(g.shape[0], -1))
        return padded.view(-1, h + r, wp)[:, :h, r : r + w].reshape(*lead, h, w), None


def path_affinity(boundary: torch.Tensor, offsets: Sequence[Offset]) -> torch.Tensor:
    """``(..., h, w)`` boundary probabilities -> ``(..., K, h, w)``: for the pair ``(y, x) -> (y + dy, x + dx)`` of
    each offset of the half neighbourhood (``dy >= 0``), 1 - the highest boundary probability on its
    :func:`line_path`; 0 for a pair leaving the image (outside counts as boundary)."""
    if any(dy < 0 for dy, _ in offsets):
        raise ValueError("path_affinity: offsets of the half neighbourhood (dy >= 0) only")
    return 1.0 - _PathMax.apply(boundary, tuple(offsets))


class BoundaryBranch(nn.Module):
    """IRN's class-boundary branch on feature levels of ``channels``: ``{"boundary": (B, 1, h, w) logits}``."""

    def __init__(self, channels: Sequence[int], width: int = 32):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True))
            for c in channels)
        self.out = nn.Conv2d(width * len(channels), 1, 1, bias=True)

    def forward(self, features: Sequence[torch.Tensor], grid: Sequence[int]) -> dict[str, torch.Tensor]:
        x = torch.cat([resize(level(f), grid) for level, f in zip(self.levels, features)], dim=1)
        return {"boundary": self.out(x)}


@REFINERS.register("irn")
class InterPixelRelations(AffinityRefiner):
    name = "irn"
    Options = IrnOptions
    walk_options = ("radius", "beta", "steps", "flip")

    def build_head(self, channels: Sequence[int]) -> nn.Module:
        return BoundaryBranch(channels)

    def pair_affinity(self, out, offsets):
        return path_affinity(torch.sigmoid(out["boundary"].float())[:, 0], offsets)

    def infer(self, net, image):
        if not self.options.flip:
            return net(image)
        logits = net(torch.cat([image, image.flip(-1)]))["boundary"]
        return {"boundary": (logits[:1] + logits[1:].flip(-1)) / 2}

    def background_scores(self, maps: np.ndarray):
        return self.options.conf_fg_threshold, self.options.conf_bg_threshold

    def walk(self, maps, out, half):
        boundary = torch.sigmoid(out["boundary"][0])  # (1, h, w)
        scores = self.grid_scores(maps, half) * (1.0 - boundary)
        walked = self.propagate(scores, half, maps.shape[-2:])
        return walked / walked.max().clamp_min(1e-12)


__all__ = ["BoundaryBranch", "InterPixelRelations", "IrnOptions", "line_path", "path_affinity"]
