"""EPS, explicit pseudo-pixel supervision (Lee, Kim & Shim, "Railroad is not a Train: Saliency as Pseudo-pixel
Supervision for Weakly Supervised Semantic Segmentation", CVPR 2021; official code github.com/halbielee/EPS,
``eps.py`` and ``module/train.py``).

The classifier's 1x1 head predicts C + 1 maps: one per foreground class and one for background. The first C maps,
globally average-pooled, are the logits of the usual multi-label soft-margin loss. All C + 1 maps together also
predict the image's saliency map S (from an off-the-shelf salient-object detector), pixel by pixel:

- p = softmax over the C + 1 channels, at the maps' resolution; S is brought to that resolution;
- for each labelled class i, the overlap O_i = |round(p_i) AND round(S)| / |round(p_i)| (no gradient). A labelled class
  with O_i > ``tau`` is foreground; one with O_i <= ``tau`` (a railroad under a train: labelled, but not salient) is
  counted with the background channel. Unlabelled classes count for neither;
- M_fg = sum of p_i over the foreground classes, M_bg = sum of p_i over the background-counted classes + p_bg;
- predicted saliency S^ = ``lam`` M_fg + (1 - ``lam``) (1 - M_bg); L_sal = mean squared error(S^, S).

Total loss = L_cls + ``saliency_weight`` L_sal. Paper and official defaults: tau = 0.4, lam = 0.5, weight 1. The
localization maps are the class channels of the softmax over all C + 1 maps (``cams``, as the official ``infer.py``
reads them: the background map competes with every class at each pixel, which is what keeps a class map off the
background it co-occurs with); map extraction (sum over scales and flips, each class divided by its maximum) and the
pseudo-mask rules of the pipeline then apply unchanged. The raw class maps, the background map's competitors alone,
score 44.7 train mIoU on MSRC-21 objects against 49.8 for CAM (benchmarks/RESULTS.md section 21).

The saliency map of each training image comes from the ``saliency`` section (:mod:`wsss.saliency`: u2net / u2netp,
a folder of precomputed PNGs, an ONNX model, or a classical transform), computed once per image before training
(:meth:`wsss.engine.train.ClassifierTask.prepare`), and reaches the loss through the image's own rescale, flip and
crop (:meth:`wsss.data.transforms.TrainTransform.apply`). With a source trained on pixel masks (u2net, u2netp, onnx,
or a folder of such maps) every figure of the run is "image labels + saliency" (I+S) in metrics.json; with a classical
source (spectral_residual, frequency_tuned) it stays I.

Where we differ from the official code, and why:

- Saliency at the maps' resolution: the official code samples S nearest-neighbour (``F.interpolate`` default); we
  average it over each map cell (area), so at stride 16 a cell's target is the fraction of it that is salient rather
  than one pixel's value, which a small shift of the crop would flip. round(S) for the overlap is then the cell's
  majority.
- Padding: the official crop pads the saliency with 0 (not salient), which teaches the model that the padded border is
  background. Ours is padded with an ignore value (:data:`~wsss.data.transforms.SALIENCY_IGNORE`); a map cell counts
  in the loss and the overlap only when at least half of its pixels are real.
- The overlap's denominator has 1e-4 added once (the official code adds it per pixel); it only keeps 0/0 at 0.
- ``saliency_weight`` (not in the paper, default 1 as there) scales L_sal.
- Backbone: the paper uses ResNet-38 at stride 8 and random-resize-long + colour-jitter augmentation; ours is the
  configured backbone (``model.*``) and the shared augmentation (``train.*``), like every other method here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig, bounded
from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method
from wsss.models import CAMClassifier, build_backbone
from wsss.models.backbones import Backbone


@dataclass
class EPSOptions:
    #: a labelled class whose (rounded) map overlaps the (rounded) saliency by more than this share of its area is
    #: foreground; otherwise it is counted with the background (paper: 0.4)
    tau: float = bounded(0.4, ge=0, le=1)
    #: blend of the foreground and the background estimate of the saliency: lam M_fg + (1 - lam) (1 - M_bg) (paper: 0.5)
    lam: float = bounded(0.5, ge=0, le=1)
    #: weight of the saliency loss against the classification loss (paper: 1)
    saliency_weight: float = bounded(1.0, gt=0)


class EPSClassifier(CAMClassifier):
    """The CAM classifier with one more head channel, the background map.

    Returns ``logits`` (B, C: the pooled class maps), ``cams`` (B, C, h, w: the localization maps, the class channels
    of the softmax over all C + 1, as the official ``infer.py`` reads them) and ``eps_maps`` (B, C + 1, h, w: the raw
    class maps and, last, the background map)."""

    def __init__(self, backbone: Backbone, num_classes: int, freeze_bn: bool = True):
        super().__init__(backbone, num_classes + 1, freeze_bn)
        self.num_classes = num_classes

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """The localization maps (B, C, h, w): the class channels of the softmax over the C + 1 maps, so that a
        pixel the background map wins scores low in every class map."""
        return torch.softmax(self.head(features).float(), dim=1)[:, : self.num_classes]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.head(self.features(x))
        cams = torch.softmax(maps.float(), dim=1)[:, : self.num_classes]
        return {"logits": maps[:, : self.num_classes].mean(dim=(2, 3)), "cams": cams, "eps_maps": maps}


def saliency_at(saliency: torch.Tensor, size: torch.Size | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The saliency (B, 1, H, W) in [0, 1], negative where padded, at the maps' ``size``: each cell's mean over its
    real pixels (area), and a (B, 1, h, w) bool of the cells that count (at least half of their pixels real)."""
    saliency = saliency.float()
    real = (saliency >= 0).float()
    if saliency.shape[-2:] == torch.Size(size):
        return saliency.clamp_min(0) * real, real > 0
    share = F.interpolate(real, size=tuple(size), mode="area")
    total = F.interpolate(saliency.clamp_min(0) * real, size=tuple(size), mode="area")
    return total / share.clamp_min(1e-6), share >= 0.5


def predicted_saliency(maps: torch.Tensor, saliency: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                       tau: float, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S^ of the module docstring from ``maps`` (B, C + 1, h, w; the background map last) and the ``saliency`` (B, 1,
    h, w) at their resolution, counting the cells of ``valid`` (B, 1, h, w) in the overlaps. Returns S^ (B, 1, h, w),
    the overlaps O (B, C) and the foreground classes (B, C) bool (labelled and O > ``tau``)."""
    p = torch.softmax(maps.float(), dim=1)
    fg_p, bg_p = p[:, :-1], p[:, -1:]
    with torch.no_grad():
        mask = valid.float()
        pred = torch.round(fg_p) * mask
        overlap = (pred * torch.round(saliency.float()) * mask).sum(dim=(2, 3)) / (pred.sum(dim=(2, 3)) + 1e-4)
    present = labels > 0.5
    fg = present & (overlap > tau)
    bg = present & ~fg
    m_fg = (fg_p * fg[:, :, None, None]).sum(dim=1, keepdim=True)
    m_bg = (fg_p * bg[:, :, None, None]).sum(dim=1, keepdim=True) + bg_p
    return lam * m_fg + (1 - lam) * (1 - m_bg), overlap, fg


def saliency_loss(maps: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float,
                  lam: float) -> torch.Tensor:
    """L_sal: mean squared error between S^ and the saliency over the map cells that count; ``saliency`` (B, 1, H, W)
    at any resolution (see :func:`saliency_at`). 0 when no cell counts."""
    target, valid = saliency_at(saliency, maps.shape[-2:])
    pred, _, _ = predicted_saliency(maps, target, valid, labels, tau, lam)
    w = valid.float()
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)


@METHODS.register("eps")
class EPS(Method):
    name = "eps"
    Options = EPSOptions
    uses_saliency = True

    @classmethod
    def check_config(cls, cfg) -> None:
        from wsss.saliency import SALIENCY_SOURCES

        sal = cfg.saliency
        source = SALIENCY_SOURCES.get(sal.source, key="saliency.source")
        try:
            source.check_settings(sal)
        except ConfigError as e:
            raise ConfigError(f"method eps learns from each training image's saliency map: {e}") from None
        if source.stores_maps and not sal.cache_maps:
            raise ConfigError(f"method eps reads every training image's saliency map in every epoch: the model source "
                              f"saliency.source={sal.source} must store them once (saliency.cache_maps=true), else "
                              "each epoch would run the saliency model on every image again")

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> nn.Module:
        return EPSClassifier(build_backbone(model_cfg), num_classes, freeze_bn=model_cfg.freeze_bn)

    def loss(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if "saliency" not in batch:
            raise KeyError("eps: the batch has no 'saliency' (the training dataset adds it for a method with "
                           "uses_saliency; see wsss.engine.train.ClassifierTask)")
        o = self.options
        labels = batch["labels"].float()
        cls = F.multilabel_soft_margin_loss(out["logits"].float(), labels)
        sal = saliency_loss(out["eps_maps"], batch["saliency"], labels, o.tau, o.lam)
        return cls + o.saliency_weight * sal, {"cls": float(cls.detach()), "sal": float(sal.detach())}
