"""Map files: one compressed ``.npz`` per image holding float16 maps of the image's classes.

``maps``: (P, H, W) float16, ``classes``: (P,) mask class indices, ``scores``: (K,) float32 classifier scores.
A safe, documented format (no pickles: loaded with ``allow_pickle=False``), written atomically.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.runs import atomic_path


def save_maps(path: Path, maps: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
    with atomic_path(Path(path), suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, maps=maps.astype(np.float16), classes=classes.astype(np.int16),
                                scores=scores.astype(np.float32))


def load_maps(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"maps": z["maps"].astype(np.float32), "classes": z["classes"].astype(np.int64),
                    "scores": z["scores"]}
    except FileNotFoundError:
        raise DataError(f"map file {path} does not exist (run `wsss maps` first)") from None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: damaged map file ({e}); delete it and rerun `wsss maps`") from None
