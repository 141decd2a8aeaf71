"""torch Datasets over reader samples: classification training and whole-image inference."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from wsss.data.io import load_image
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import TrainTransform, to_tensor
from wsss.errors import DataError
from wsss.runs import atomic_path

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


def save_erase_mask(path: Path, mask: np.ndarray) -> None:
    """A bilevel PNG (1 = erased), written atomically."""
    with atomic_path(Path(path), suffix=".png") as tmp:
        Image.fromarray(np.asarray(mask, bool)).save(tmp, format="PNG")


def load_erase_mask(path: Path, hw: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) bool erase mask; ``hw`` is checked against the image it is applied to."""
    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 0
    except FileNotFoundError:
        raise DataError(f"erase mask {path} does not exist (its round's erase step did not finish; rerun)") from None
    except OSError as e:
        raise DataError(f"{path}: damaged erase mask ({e}); delete it and rerun") from None
    if hw is not None and mask.shape != tuple(hw):
        raise DataError(f"{path}: erase mask is {mask.shape[0]}x{mask.shape[1]}, its image {hw[0]}x{hw[1]}")
    return mask


def mean_colour(samples: Sequence[Sample]) -> tuple[int, int, int]:
    """Mean RGB over all pixels of the images (each image weighted by its pixel count), rounded to uint8."""
    total = np.zeros(3, np.float64)
    pixels = 0
    for s in samples:
        rgb = load_image(s.image)
        total += rgb.reshape(-1, 3).sum(0, dtype=np.float64)
        pixels += rgb.shape[0] * rgb.shape[1]
    if not pixels:
        raise DataError("mean colour of an empty image list")
    r, g, b = np.clip(np.rint(total / pixels), 0, 255).astype(int).tolist()
    return r, g, b


@dataclass
class ErasedInputs:
    """Per-image erase masks ``masks_dir/<id>.png`` whose pixels are filled with ``fill`` (RGB) in the original image,
    before any augmentation (Adversarial Erasing, :mod:`wsss.methods.adv_erase`)."""

    masks_dir: Path
    fill: tuple[int, int, int]

    def apply(self, rgb: np.ndarray, sample_id: str) -> np.ndarray:
        mask = load_erase_mask(Path(self.masks_dir) / f"{sample_id}.png", rgb.shape[:2])
        out = rgb.copy()
        out[mask] = np.asarray(self.fill, np.uint8)
        return out


class ClassificationDataset(Dataset):
    """Items are ``(index, seed)`` pairs from :class:`SeededSampler`; returns image, multi-hot labels, index.
    With ``erase``, each image is erased by its mask before the transform."""

    def __init__(self, samples: list[Sample], spec: DatasetSpec, transform: TrainTransform,
                 erase: ErasedInputs | None = None):
        self.samples = samples
        self.spec = spec
        self.transform = transform
        self.erase = erase
        self.targets = [label_vector(s.labels or (), spec) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item
        s = self.samples[index]
        rgb = load_image(s.image)
        if self.erase is not None:
            rgb = self.erase.apply(rgb, s.id)
        img, _ = self.transform(rgb, None, seed)
        return {"image": img, "labels": self.targets[index], "index": index}


class SeededSampler(Sampler):
    """Shuffles with ``seed + epoch`` and hands each sample its own augmentation seed.

    Sharding over ``world`` processes is done here (rank r takes every world-th item of the padded permutation),
    so one sampler serves single-process and DDP training and batches do not depend on loader workers.
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
    """Whole images (no augmentation) for map extraction and prediction; with ``erase``, erased first."""

    def __init__(self, samples: list[Sample], spec: DatasetSpec, erase: ErasedInputs | None = None):
        self.samples = samples
        self.spec = spec
        self.erase = erase

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = self.samples[index]
        rgb = load_image(s.image)
        if self.erase is not None:
            rgb = self.erase.apply(rgb, s.id)
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
