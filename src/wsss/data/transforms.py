"""Joint image/mask transforms (torchvision ``transforms.v2`` with ``tv_tensors``).

Training augmentation is random rescale, horizontal flip and a random crop padded with the mean colour (zero after
normalisation) and with the ignore index in the mask. A method that learns from saliency (EPS) gets the image's
saliency map through the same rescale, flip and crop (:meth:`TrainTransform.apply`), padded with
:data:`SALIENCY_IGNORE`. Randomness is drawn from an explicit seed per sample so that an epoch's batches are identical
whatever the number of loader workers or processes, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

#: the value of a saliency map where the crop padded the image (saliency itself is in [0, 1]); losses exclude it
SALIENCY_IGNORE = -1.0


class SaliencyMap(tv_tensors.Mask):
    """A (1, H, W) float saliency map in [0, 1] that travels with its image: flipped and cropped by the mask kernels
    (nearest, so no value is blended), padded with :data:`SALIENCY_IGNORE` (its own entry of the crop's fill); the
    random rescale is done bilinearly by :meth:`TrainTransform.apply`, as for the image."""


def to_tensor(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float32."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    t = F.to_dtype(t, torch.float32, scale=True)
    return F.normalize(t, list(mean), list(std))


class TrainTransform:
    """Random rescale x[lo, hi], optional flip, random crop (padded) of ``crop`` pixels: a side, or (height, width)."""

    def __init__(self, crop: int | tuple[int, int], scale_range: tuple[float, float], hflip: bool = True, ignore_index: int = 255,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale_range = scale_range
        self.mean, self.std = mean, std
        ops: list = []
        if hflip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        size = crop if isinstance(crop, int) else tuple(crop)
        ops.append(v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index,
                                                                  SaliencyMap: SALIENCY_IGNORE}))
        self.ops = v2.Compose(ops)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, seed: int):
        img, m, _ = self.apply(image, seed, mask=mask)
        return img, m

    def apply(self, image: np.ndarray, seed: int, mask: np.ndarray | None = None, saliency: np.ndarray | None = None):
        """(image, mask, saliency) transformed with one draw of the random rescale, flip and crop: ``mask`` (H, W)
        integer labels (nearest; padded with the ignore index) and ``saliency`` (H, W) float in [0, 1] (bilinear like
        the image; padded with :data:`SALIENCY_IGNORE`, returned as (1, h, w)), each None when not given. The draws do
        not depend on which of them are given, so an image is augmented alike with and without them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = tv_tensors.Image(to_tensor(image, self.mean, self.std))
            lo, hi = self.scale_range
            s = lo + (hi - lo) * torch.rand(()).item()
            h, w = img.shape[-2:]
            size = [max(1, round(h * s)), max(1, round(w * s))]
            img = F.resize(img, size, antialias=True)
            extra: list = []
            if mask is not None:
                extra.append(F.resize(tv_tensors.Mask(torch.from_numpy(mask)), size))  # nearest for Mask
            if saliency is not None:
                sal = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(saliency, np.float32))[None])
                extra.append(F.resize(sal, size, antialias=True).as_subclass(SaliencyMap))
            img, *rest = [t.as_subclass(torch.Tensor) for t in (self.ops(img, *extra) if extra else (self.ops(img),))]
            m = rest.pop(0) if mask is not None else None
            sal = rest.pop(0) if saliency is not None else None
            return img, m, sal
