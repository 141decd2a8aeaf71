"""SEC: seed, expand and constrain (Kolesnikov & Lampert, "Seed, Expand and Constrain: Three Principles for
Weakly-Supervised Image Segmentation", ECCV 2016) as a recipe for training the segmentation network.

The network's softmax output ``f`` (B, C, h, w) over *all* mask classes is trained with three losses:

- **Seeding** (:func:`seeding_loss`): cross-entropy on sparse localization cues only -- pixels where a class's
  normalised localization map is high; with a background class, background cues where every class map is low.
- **Expansion** (:func:`expansion_loss`): a global weighted rank pooling (GWRP, :func:`gwrp`) of each class's scores
  is an image-level classification score: present classes must score high, absent classes low. GWRP sorts a class's
  scores in decreasing order and averages them with weights ``d^j`` -- ``d = 0`` is max pooling, ``d = 1`` average
  pooling -- so the decay says how large an object is expected to be. As in the paper, foreground classes use
  ``d+`` (0.996), background ``d_bg`` (0.999), absent classes ``d- = 0`` (max).
- **Constrain** (:func:`constrain_loss`): KL(Q || f) with ``Q`` the dense CRF of ``f`` on the (downscaled) image,
  per batch, treated as a constant: the network learns to produce maps that already respect colour boundaries.

Where we differ from the paper, and why:

- The network is DeepLabV3 on a wsss backbone (the paper: DeepLab-LargeFOV, VGG16); its logits are resized to
  ``1/loss_stride`` of the crop (``seg.sec.loss_stride``, default 8: the paper's 41x41 for 321x321 crops) for all
  three losses, whatever the network's own output stride.
- Cues come from our localization maps (any localizer) rather than the paper's own localization network. Each cue
  pixel gets one label, the best class above ``seed_threshold`` (the paper allows several cue labels per pixel).
  Background cues are pixels where every class map is below ``bg_cue_threshold`` (the paper: a saliency model);
  datasets without a background class (MSRC-21) have no background cue and no background GWRP term.
- The CRF runs over the image's classes (+ background) with ``f`` renormalised over them: absent classes have
  ``Q = 0`` and contribute nothing to the KL, and the expansion loss already pushes them down. Its spatial kernel
  widths are the ``crf.*`` settings divided by the stride (the paper's ``scale_factor``), so the config means
  the same thing at full resolution.
- The image for the CRF is recovered from the normalised batch by inverting the normalisation exactly (then
  rounding to uint8), never by casting normalised floats.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.nn import functional as F

from wsss.config.schema import CrfConfig
from wsss.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

#: probabilities are clipped before logs (as the dense CRF's unary)
EPS = 1e-5


def gwrp(scores: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Global weighted rank pooling of ``scores`` (..., N) with a decay per row (...,): sum_j d^j s_(j) / sum_j d^j,
    ``s_(j)`` the scores sorted in decreasing order (j from 0). ``d = 0`` gives the max."""
    s = scores.sort(dim=-1, descending=True).values
    n = s.shape[-1]
    j = torch.arange(n, device=s.device, dtype=s.dtype)
    d = decay.to(s.dtype).unsqueeze(-1)
    # d^j with 0^0 = 1 (torch.pow gives 1 for 0**0)
    w = torch.pow(d, j)
    return (w * s).sum(-1) / w.sum(-1)


def seeding_loss(logits: torch.Tensor, cues: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over cue pixels of the batch (0 when there is no cue at all)."""
    if not (cues != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, cues, ignore_index=ignore_index)


def expansion_loss(probs: torch.Tensor, present: torch.Tensor, background: int | None, fg_decay: float = 0.996,
                   bg_decay: float = 0.999) -> torch.Tensor:
    """``probs`` (B, C, h, w) softmax; ``present`` (B, C) bool over mask classes (the background entry is ignored).

    -mean_{c present} log G_c - mean_{c absent} log(1 - G_c) - log G_bg, averaged over the batch; GWRP decays
    ``fg_decay`` for present classes, 0 for absent ones, ``bg_decay`` for the background.
    """
    b, c = probs.shape[:2]
    flat = probs.reshape(b, c, -1)
    present = present.bool().clone()
    is_bg = torch.zeros(c, dtype=torch.bool, device=probs.device)
    if background is not None:
        is_bg[background] = True
        present[:, background] = False
    decay = torch.where(present, torch.tensor(fg_decay), torch.tensor(0.0)).to(probs.device)
    decay[:, is_bg] = bg_decay
    g = gwrp(flat, decay).clamp(EPS, 1 - EPS)
    absent = ~present & ~is_bg
    pos = -(torch.log(g) * present).sum(1) / present.sum(1).clamp(min=1)
    neg = -(torch.log(1 - g) * absent).sum(1) / absent.sum(1).clamp(min=1)
    loss = pos + neg
    if background is not None:
        loss = loss - torch.log(g[:, background])
    return loss.mean()


def constrain_loss(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Q || f) = mean over pixels of sum_c Q log(Q / f); ``q`` is a constant target of ``probs``' shape."""
    q = q.detach().to(probs.dtype)
    kl = q * (torch.log(q.clamp(min=EPS)) - torch.log(probs.clamp(min=EPS)))
    return kl.sum(1).mean()


def images_uint8(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised (B, 3, H, W) float images -> (B, H, W, 3) uint8 RGB, by inverting the normalisation."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = ((x.detach().float().cpu() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def crf_targets(probs: torch.Tensor, images: np.ndarray, present: torch.Tensor, crf: CrfConfig,
                stride: float) -> torch.Tensor:
    """Dense CRF of ``probs`` (B, C, h, w) over each image's present classes on ``images`` (B, h, w, 3) uint8 ->
    Q of the same shape (zero on the other classes). Spatial kernel widths are divided by ``stride``."""
    from wsss.refine.crf import dense_crf

    small = dataclasses.replace(crf, gaussian_sxy=crf.gaussian_sxy / stride, bilateral_sxy=crf.bilateral_sxy / stride)
    p = probs.detach().float().cpu().numpy()
    q = np.zeros_like(p)
    for i in range(len(p)):
        idx = np.flatnonzero(present[i].cpu().numpy())
        sub = p[i, idx]
        sub = sub / np.clip(sub.sum(0, keepdims=True), EPS, None)
        q[i, idx] = dense_crf(images[i], sub, small)
    return torch.from_numpy(q).to(probs.device)


@dataclasses.dataclass
class SecLosses:
    """The three SEC losses on one batch; each switchable for ablation."""

    background: int | None
    ignore_index: int
    crf: CrfConfig
    seed: bool = True
    expand: bool = True
    constrain: bool = True
    fg_decay: float = 0.996
    bg_decay: float = 0.999
    #: the losses are computed at 1/loss_stride of the crop
    loss_stride: int = 8

    def __call__(self, logits: torch.Tensor, cues: torch.Tensor, present: torch.Tensor, images: torch.Tensor):
        """``logits`` (B, C, h', w') at any resolution, ``cues`` (B, H, W) long at the crop's, ``present`` (B, C),
        ``images`` the normalised crops (B, 3, H, W). Returns (loss, parts)."""
        h, w = cues.shape[-2:]
        size = (max(1, round(h / self.loss_stride)), max(1, round(w / self.loss_stride)))
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        parts: dict[str, float] = {}
        total = logits.sum() * 0.0
        if self.seed:
            small_cues = F.interpolate(cues[:, None].float(), size=size, mode="nearest")[:, 0].long()
            loss = seeding_loss(logits, small_cues, self.ignore_index)
            parts["seed"] = float(loss.detach())
            total = total + loss
        if self.expand:
            loss = expansion_loss(probs, present, self.background, self.fg_decay, self.bg_decay)
            parts["expand"] = float(loss.detach())
            total = total + loss
        if self.constrain:
            small = F.interpolate(images.float(), size=size, mode="area")
            q = crf_targets(probs, images_uint8(small), present, self.crf, h / size[0])
            loss = constrain_loss(probs, q)
            parts["constrain"] = float(loss.detach())
            total = total + loss
        return total, parts
