"""``folder``: precomputed saliency maps, one 8-bit grey PNG per image, ``<saliency.folder>/<id>.png`` (0 = not
salient, 255 = salient), the same size as the image -- the layout in which WSSS benchmarks (e.g. WSSS-BED) ship
the saliency maps of PASCAL VOC / COCO.

Every map of a split is checked for existence before any work (:meth:`FolderSaliency.check`): a missing map is a
:class:`~wsss.errors.DataError` that lists the missing ids, never a silent fallback to another source. A map of the
wrong size is an error too (a resized or a wrong dataset's map would be silently misaligned).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import ConfigError, DataError
from wsss.saliency.base import SALIENCY_SOURCES, SaliencySource

#: at most this many missing ids are spelled out in the error (the count is always given)
LIST_AT_MOST = 100


@SALIENCY_SOURCES.register("folder")
class FolderSaliency(SaliencySource):
    options = ("folder",)

    @classmethod
    def check_settings(cls, cfg) -> None:
        if not cfg.folder:
            raise ConfigError("saliency.folder: the folder saliency source needs the directory of <id>.png maps")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.check_settings(cfg)
        self.folder = Path(cfg.folder)
        if not self.folder.is_dir():
            raise ConfigError(f"saliency.folder: {self.folder} is not a directory")

    def path(self, sample: Any) -> Path:
        return self.folder / f"{sample.id}.png"

    def check(self, samples: Sequence[Any]) -> None:
        missing = [s.id for s in samples if not self.path(s).is_file()]
        if missing:
            shown = ", ".join(missing[:LIST_AT_MOST])
            more = f" and {len(missing) - LIST_AT_MOST} more" if len(missing) > LIST_AT_MOST else ""
            raise DataError(f"saliency.folder {self.folder}: no saliency map <id>.png for {len(missing)} of "
                            f"{len(samples)} images: {shown}{more}")

    @classmethod
    def fingerprint(cls, cfg) -> dict:
        try:
            files = [e.stat() for e in os.scandir(cfg.folder) if e.name.endswith(".png")]
        except (OSError, TypeError):
            return {"missing": True}
        return {"files": len(files), "bytes": sum(f.st_size for f in files),
                "mtime_ns": max((f.st_mtime_ns for f in files), default=0)}

    def compute(self, image: np.ndarray, sample: Any) -> np.ndarray:
        path = self.path(sample)
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L"):
                    sal = np.asarray(img, np.float32) / 65535.0
                else:
                    sal = np.asarray(img.convert("L"), np.float32) / 255.0
        except FileNotFoundError:
            raise DataError(f"{path}: saliency map does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot decode saliency map: {e}") from None
        if sal.shape != image.shape[:2]:
            raise DataError(f"{path}: saliency map is {sal.shape[1]}x{sal.shape[0]} (WxH) but its image is "
                            f"{image.shape[1]}x{image.shape[0]}")
        return sal
