"""Joint image/mask transforms (torchvision ``transforms.v2`` with ``tv_tensors``).

Training augmentation is random rescale, horizontal flip and a random crop padded with the mean colour (zero after
normalisation) and with the ignore index in the mask. Randomness is drawn from an explicit seed per sample so that
an epoch's batches are identical whatever the number of loader workers or processes, and a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


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
        ops.append(v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index}))
        self.ops = v2.Compose(ops)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = tv_tensors.Image(to_tensor(image, self.mean, self.std))
            lo, hi = self.scale_range
            s = lo + (hi - lo) * torch.rand(()).item()
            h, w = img.shape[-2:]
            size = [max(1, round(h * s)), max(1, round(w * s))]
            img = F.resize(img, size, antialias=True)
            if mask is None:
                return self.ops(img).as_subclass(torch.Tensor), None
            m = tv_tensors.Mask(torch.from_numpy(mask))
            m = F.resize(m, size)  # nearest for Mask
            img, m = self.ops(img, m)
            return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)
