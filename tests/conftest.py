"""Shared fixtures: a tiny synthetic dataset in VOC layout, built at test time, and a fast config for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config

REPO = Path(__file__).resolve().parents[1]
MSRC = REPO.parent / "shared" / "data" / "msrc21"

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def make_voc_dataset(root: Path, splits=(("train", 8), ("val", 4), ("test", 4)), h=48, w=64, seed=0,
                     background=False) -> Path:
    """Images with one or two coloured rectangles on a grey (background) or textured field; masks to match."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    classes = (["background"] if background else ["ground"]) + names
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in splits:
        ids = []
        for _ in range(n):
            img = np.full((h, w, 3), 128, np.uint8) + rng.integers(-10, 10, (h, w, 3)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            present = rng.choice(len(names), size=1 + (k % 2), replace=False)
            for j, c in enumerate(present):
                y0 = rng.integers(0, h // 2)
                x0 = (w // 2) * j + rng.integers(0, w // 4)
                y1, x1 = y0 + h // 2, min(w, x0 + w // 3)
                img[y0:y1, x0:x1] = COLOURS[names[c]]
                mask[y0:y1, x0:x1] = c + 1
            mask[0, 0] = 255  # a void pixel, as in real ground truth
            i = f"img{k:03d}"
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
            m = Image.fromarray(mask, "P")
            m.putpalette([0, 0, 0] * 256)
            m.save(root / "SegmentationClass" / f"{i}.png")
            ids.append(i)
            k += 1
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    spec = {"name": "toy", "classes": classes, "background": "background" if background else None, "ignore_index": 255}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


class Killed(Exception):
    """Stands for a kill of the process: raised from a training's after-epoch hook."""


def kill_after_first_epoch(epoch: int) -> None:
    if epoch == 1:
        raise Killed


@pytest.fixture(autouse=True)
def private_saliency_cache(tmp_path_factory, monkeypatch):
    """The saliency cache of every test (model files, stored maps) is a fresh temporary folder, never the user's
    ~/.cache/wsss (wsss.saliency.cache.cache_dir reads WSSS_CACHE)."""
    monkeypatch.setenv("WSSS_CACHE", str(tmp_path_factory.mktemp("wsss-cache")))


@pytest.fixture
def toy_root(tmp_path) -> Path:
    return make_voc_dataset(tmp_path / "toy")


def fast_overrides(root: Path, runs: Path, **extra) -> list[str]:
    base = {
        "data.root": str(root),
        "data.workers": 0,
        "runs_dir": str(runs),
        "name": "t",
        "model.backbone": "mobilenet_v2",
        "model.output_stride": 32,
        "model.pretrained": False,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.crop_size": 48,
        "runtime.precision": "fp32",
        "runtime.channels_last": False,
        "runtime.progress": False,
        "maps.scales": "[1.0]",
        "seg.model.pretrained": False,
        "seg.train.epochs": 1,
        "seg.train.batch_size": 4,
        "seg.train.crop_size": 48,
        "seg.model.output_stride": 32,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def fast_cfg(toy_root, tmp_path):
    def make(**extra):
        return load_config(None, fast_overrides(toy_root, tmp_path / "runs", **extra))

    return make
