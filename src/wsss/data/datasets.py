"""torch Datasets over reader samples: classification training and whole-image inference."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from wsss.data.io import load_image
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import TrainTransform, to_tensor

log = logging.getLogger("wsss.data")


def label_vector(labels: Sequence[int], spec: DatasetSpec) -> torch.Tensor:
    """Multi-hot vector over the foreground classes."""
    v = torch.zeros(spec.num_fg)
    pos = {c: i for i, c in enumerate(spec.fg_ids)}
    for c in labels:
        v[pos[c]] = 1.0
    return v


def drop_unlabelled(samples: list[Sample], what: str) -> tuple[list[Sample], list[str]]:
    """Images with an empty label set carry no signal for a multi-label classifier: skip them, with a warning."""
    kept = [s for s in samples if s.labels]
    skipped = [s.id for s in samples if not s.labels]
    if skipped:
        log.warning("%s: skipping %d image(s) with an empty label set: %s%s", what, len(skipped),
                    ", ".join(skipped[:10]), " ..." if len(skipped) > 10 else "")
    return kept, skipped


class ImageFilter(Protocol):
    """A change of the input images that a recipe makes before any augmentation (e.g. hiding regions found by an
    earlier round): ``(uint8 RGB (H, W, 3), sample id) -> uint8 RGB of the same size``. Picklable, for loader
    workers."""

    def __call__(self, rgb: np.ndarray, sample_id: str) -> np.ndarray: ...


class ClassificationDataset(Dataset):
    """Items are ``(index, seed)`` pairs from :class:`SeededSampler`; returns image, multi-hot labels, index.
    With ``image_filter``, each image is filtered before the transform. With ``saliency`` (``(uint8 RGB image as
    loaded, sample) -> (H, W) float in [0, 1]``, picklable for loader workers, e.g.
    :class:`wsss.saliency.StoredSaliency`), the item also has ``"saliency"``: that map (of the unfiltered image)
    through the image's own rescale, flip and crop, (1, h, w), :data:`~wsss.data.transforms.SALIENCY_IGNORE` where the
    crop padded."""

    def __init__(self, samples: list[Sample], spec: DatasetSpec, transform: TrainTransform,
                 image_filter: ImageFilter | None = None,
                 saliency: Callable[[np.ndarray, Sample], np.ndarray] | None = None):
        self.samples = samples
        self.spec = spec
        self.transform = transform
        self.image_filter = image_filter
        self.saliency = saliency
        self.targets = [label_vector(s.labels or (), spec) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item
        s = self.samples[index]
        rgb = load_image(s.image)
        sal = self.saliency(rgb, s) if self.saliency is not None else None
        if self.image_filter is not None:
            rgb = self.image_filter(rgb, s.id)
        if sal is None:
            img, _ = self.transform(rgb, None, seed)
            return {"image": img, "labels": self.targets[index], "index": index}
        img, _, sal = self.transform.apply(rgb, seed, saliency=sal)
        return {"image": img, "labels": self.targets[index], "index": index, "saliency": sal}


class SeededSampler(Sampler):
    """Shuffles with ``seed + epoch`` and hands each sample its own augmentation seed.

    Sharding over ``world`` processes is done here (rank r takes every world-th item of the padded permutation),
    so one sampler serves single-process and DDP training and batches do not depend on loader workers.
    Only the training loop may call :meth:`set_epoch`: a loader wrapper that calls it with its own count of
    iterations (Fabric's ``setup_dataloaders``) restarts that count at 0 in a resumed process.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        total = len(self) * self.world
        order = (order * (total // max(self.n, 1) + 1))[:total]
        for i in order[self.rank :: self.world]:
            yield i, seeds[i]


class InferenceDataset(Dataset):
    """Whole images (no augmentation) for map extraction and prediction; with ``image_filter``, filtered first."""

    def __init__(self, samples: list[Sample], spec: DatasetSpec, image_filter: ImageFilter | None = None):
        self.samples = samples
        self.spec = spec
        self.image_filter = image_filter

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = self.samples[index]
        rgb = load_image(s.image)
        if self.image_filter is not None:
            rgb = self.image_filter(rgb, s.id)
        return {
            "image": to_tensor(rgb),
            "labels": label_vector(s.labels or (), self.spec),
            "index": index,
            "id": s.id,
        }


def batches_by_size(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Group indices of equal image size into batches (whole images cannot be stacked otherwise)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(tuple(hw), []).append(i)
    out = []
    for idx in groups.values():
        for k in range(0, len(idx), batch_size):
            out.append(idx[k : k + batch_size])
    out.sort(key=lambda b: b[0])
    return out


def stack(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class SegmentationDataset(Dataset):
    """Images with masks (pseudo or ground truth) for the segmentation network; items are ``(index, seed)``."""

    def __init__(self, samples: list[Sample], masks, transform: TrainTransform):
        self.samples, self.masks, self.transform = samples, masks, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item
        s = self.samples[index]
        rgb = load_image(s.image)
        img, mask = self.transform(rgb, self.masks(s, rgb.shape[:2]), seed)
        return {"image": img, "mask": mask.long(), "index": index}


def loader_workers(configured: int) -> int:
    """Data-loader worker processes: ``data.workers``, but never more than the cores this process may use (torch
    warns about more, and they only add switching); 0 stays 0."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(int(configured), cores))
