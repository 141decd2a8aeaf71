"""Image-mixing methods: Mixup (with Mixup-CAM's regularisers) and CutMix, two registered names.

- Mixup (Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018): image i of the
  batch becomes lam * x_i + (1 - lam) * x_perm(i), its label lam * y_i + (1 - lam) * y_perm(i), lam ~ Beta(alpha,
  alpha), perm a random permutation of the batch.
- Mixup-CAM (Chang, Wang, Hung, Piramuthu, Tsai & Yang, "Mixup-CAM: Weakly-supervised Semantic Segmentation via
  Uncertainty Regularization", BMVC 2020): Mixup on the WSSS classifier, plus two regularisers on its class maps M:
  the pixel-wise entropy of the class-probability maps P = softmax over classes of M,
  L_ent = -1/(h w) sum_{h,w} sum_c P^c log P^c, and a concentration loss (from SCOPS, Hung et al., CVPR 2019) on
  each labelled class's map normalised to a spatial distribution M^c, L_con = sum_{h,w} ||(h, w) - mu^c||^2 M^c(h, w)
  with mu^c its centre of mass. Total: L_cls + entropy_weight * L_ent + concentration_weight * L_con.
- CutMix (Yun, Han, Oh, Chun, Choe & Yoo, "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features", ICCV 2019): a box of area ratio 1 - lam (sides sqrt(1 - lam) of the image's, centre
  uniform over the image) is cut from x_perm(i) and pasted into x_i; the box is clipped to the image and the label
  uses the exact pasted fraction after clipping: (1 - f) * y_i + f * y_perm(i).

The multi-label soft-margin loss of the base method takes these soft targets as they are (a class in both images
keeps target 1).

Where we differ from the papers, and why:

- lam is drawn per image, not once per batch as in the papers' code: more variety for the same cost; the
  expectation is the same.
- The Beta draw comes from a NumPy generator seeded from the loop's torch generator (torch has no seeded Beta
  sampler), so resumed runs still mix identically.
- Mixup-CAM's weights: the paper's values could not be consulted here. Defaults 0.1 and 0.1 are untuned
  (choose them on val); with coordinates in [0, 1] a uniform map has L_con = 1/6 and the entropy is at most log K.
  The concentration loss uses the classes with a non-zero mixed label, averaged over those (image, class) pairs
  (the paper sums over an image's classes; the mean keeps the weight's meaning independent of how many classes an
  image has), and adds 1e-3 to the ReLU map before normalising, as SCOPS does, so a map that is zero everywhere
  has a finite gradient.
- ``prob``: the chance that a batch is mixed at all (CutMix used 0.5 on CIFAR and 1.0 on ImageNet); default 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method


def beta_sample(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha), reproducible from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator):
    """Mix every image with image ``perm[i]`` of the batch. Returns (images, labels, lam (B,), perm (B,))."""
    b = images.shape[0]
    perm = torch.randperm(b, generator=generator)
    lam = beta_sample(alpha, b, generator)
    lam_dev = lam.to(images.device)
    perm_dev = perm.to(images.device)
    mixed = lam_dev.view(b, 1, 1, 1) * images + (1 - lam_dev.view(b, 1, 1, 1)) * images[perm_dev]
    mixed_labels = lam_dev.view(b, 1) * labels + (1 - lam_dev.view(b, 1)) * labels[perm_dev]
    return mixed, mixed_labels, lam, perm


def cutmix_boxes(height: int, width: int, lam: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) bool: per image, a box of area ratio about 1 - lam[i], centre uniform over the image, clipped."""
    b = lam.shape[0]
    ratio = torch.sqrt(1 - lam)
    cut_h = (height * ratio).floor().long()
    cut_w = (width * ratio).floor().long()
    cy = torch.randint(height, (b,), generator=generator)
    cx = torch.randint(width, (b,), generator=generator)
    y0, y1 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x0, x1 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    ys = torch.arange(height).view(1, height, 1)
    xs = torch.arange(width).view(1, 1, width)
    return ((ys >= y0.view(b, 1, 1)) & (ys < y1.view(b, 1, 1)) & (xs >= x0.view(b, 1, 1)) & (xs < x1.view(b, 1, 1)))


def cutmix(images: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator):
    """Paste a box of image ``perm[i]`` into image i. Labels weight each source by its exact pixel share.
    Returns (images, labels, pasted (B, H, W) bool, perm (B,))."""
    b, _, h, w = images.shape
    perm = torch.randperm(b, generator=generator)
    lam = beta_sample(alpha, b, generator)
    pasted = cutmix_boxes(h, w, lam, generator).to(images.device)
    perm_dev = perm.to(images.device)
    mixed = torch.where(pasted[:, None], images[perm_dev], images)
    frac = pasted.flatten(1).float().mean(dim=1).view(b, 1)
    mixed_labels = (1 - frac) * labels + frac * labels[perm_dev]
    return mixed, mixed_labels, pasted, perm


def pixel_entropy(cams: torch.Tensor) -> torch.Tensor:
    """Mean over images and pixels of the entropy of softmax over classes of (B, K, h, w) maps."""
    logp = F.log_softmax(cams.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def concentration(cams: torch.Tensor, present: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean over the (image, class) pairs with ``present`` (B, K) true of the spatial variance of the class's ReLU
    map taken as a distribution over pixel centres in [0, 1] x [0, 1]. Zero when nothing is present."""
    b, k, h, w = cams.shape
    m = torch.relu(cams.float()) + eps
    pdf = m / m.sum(dim=(2, 3), keepdim=True)
    ys = ((torch.arange(h, device=cams.device) + 0.5) / h).view(1, 1, h, 1)
    xs = ((torch.arange(w, device=cams.device) + 0.5) / w).view(1, 1, 1, w)
    mu_y = (pdf * ys).sum(dim=(2, 3), keepdim=True)
    mu_x = (pdf * xs).sum(dim=(2, 3), keepdim=True)
    var = (pdf * ((ys - mu_y) ** 2 + (xs - mu_x) ** 2)).sum(dim=(2, 3))  # (B, K)
    present = present.float()
    return (var * present).sum() / present.sum().clamp_min(1.0)


def _check_mix(alpha: float, prob: float) -> None:
    if alpha <= 0:
        raise ConfigError(f"method.options.alpha: the Beta parameter must be > 0, got {alpha}")
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"method.options.prob: must be in [0, 1], got {prob}")


def _mixes(prob: float, generator: torch.Generator) -> bool:
    # always drawn, so the generator's stream does not depend on prob
    return bool(torch.rand(1, generator=generator) < prob)


@dataclass
class MixupOptions:
    #: lam ~ Beta(alpha, alpha); 1 = uniform
    alpha: float = 1.0
    #: probability that a batch is mixed
    prob: float = 1.0
    #: Mixup-CAM pixel-wise class entropy weight (0 = plain Mixup)
    entropy_weight: float = 0.1
    #: Mixup-CAM concentration loss weight (0 = off)
    concentration_weight: float = 0.1

    def __post_init__(self):
        _check_mix(self.alpha, self.prob)
        if self.entropy_weight < 0 or self.concentration_weight < 0:
            raise ConfigError("method.options.entropy_weight / concentration_weight: weights must be >= 0, got "
                              f"{self.entropy_weight} / {self.concentration_weight}")


@METHODS.register("mixup")
class Mixup(Method):
    name = "mixup"
    Options = MixupOptions

    def transform_batch(self, batch, generator):
        if not _mixes(self.options.prob, generator):
            return batch
        images, labels, _, _ = mixup(batch["image"], batch["labels"], self.options.alpha, generator)
        return {**batch, "image": images, "labels": labels}

    def loss(self, out, batch):
        loss, parts = super().loss(out, batch)
        o = self.options
        if o.entropy_weight > 0:
            ent = pixel_entropy(out["cams"])
            loss = loss + o.entropy_weight * ent
            parts["entropy"] = float(ent.detach())
        if o.concentration_weight > 0:
            con = concentration(out["cams"], batch["labels"] > 0)
            loss = loss + o.concentration_weight * con
            parts["concentration"] = float(con.detach())
        return loss, parts


@dataclass
class CutMixOptions:
    #: lam ~ Beta(alpha, alpha) (paper: 1); the pasted box covers about 1 - lam of the image
    alpha: float = 1.0
    #: probability that a batch is mixed
    prob: float = 1.0

    def __post_init__(self):
        _check_mix(self.alpha, self.prob)


@METHODS.register("cutmix")
class CutMix(Method):
    name = "cutmix"
    Options = CutMixOptions

    def transform_batch(self, batch, generator):
        if not _mixes(self.options.prob, generator):
            return batch
        images, labels, _, _ = cutmix(batch["image"], batch["labels"], self.options.alpha, generator)
        return {**batch, "image": images, "labels": labels}
