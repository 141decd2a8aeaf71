"""The saliency cache: where model files and the maps of the model sources are kept between runs.

``<cache_dir>`` is ``saliency.cache_dir``, else ``$WSSS_CACHE/saliency``, else ``$XDG_CACHE_HOME/wsss/saliency``
(``~/.cache/wsss/saliency``). It holds the named model files (``u2net.onnx``, ``u2netp.onnx``; see
:mod:`wsss.saliency.fetch`) and ``maps/<source>-<key>/<image digest>.png``.

A model source takes about a second per image on the CPU (U²-Net), and the pseudo stage is recomputed whenever one
of its settings changes (a threshold, an ignore band, the CRF after the fusion) while the saliency stays the same;
the runs of a benchmark share their images too. So each image's map is stored once (:class:`MapCache`) under the
identity of what produced it -- the source, the sha256 of the model file, its input size, normalisation and output
mode -- and the sha256 of the image's **pixels** (not its id or path: the same id in another dataset is another
image), and any later run reads it back.

Maps are 16-bit grey PNGs (0..65535 for [0, 1]) of the image's size, the format the ``folder`` source reads. A model
source's map is always quantised to these 16 bits (:func:`quantize`), stored or not, so a map read back is
exactly the map computed and ``saliency.cache_maps`` never changes a result. Files are written atomically (a killed
run leaves whole maps or none); an unreadable one is computed again and overwritten. Each model folder has a
``model.json`` that says what made it. Nothing here deletes a map: delete ``maps/`` to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.runs import atomic_path, atomic_write_json

log = logging.getLogger("wsss.saliency")

#: changes when the stored maps of the same model and settings would differ (format, resizing, quantisation)
FORMAT = 1
LEVELS = 65535


def cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """The saliency cache: ``configured`` (``saliency.cache_dir``), else ``$WSSS_CACHE/saliency``, else
    ``$XDG_CACHE_HOME/wsss/saliency`` (``~/.cache/wsss/saliency``)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("WSSS_CACHE"):
        return Path(os.environ["WSSS_CACHE"]).expanduser() / "saliency"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wsss" / "saliency"


def quantize(sal: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 (0..65535)."""
    return np.round(np.clip(sal, 0.0, 1.0) * LEVELS).astype(np.uint16)


def dequantize(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) / LEVELS).astype(np.float32)


def image_digest(image: np.ndarray) -> str:
    """sha256 of an image's pixels, shape and dtype."""
    h = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class MapCache:
    """The stored maps of one model and its settings (``identity``: JSON-able, with a ``source`` name)."""

    def __init__(self, root: str | os.PathLike, identity: dict[str, Any]):
        self.identity = {"format": FORMAT, **identity}
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / "maps" / f"{identity['source']}-{key}"
        self.writable = True

    def path(self, image: np.ndarray) -> Path:
        return self.dir / f"{image_digest(image)[:32]}.png"

    def has(self, image: np.ndarray) -> bool:
        return self.path(image).is_file()

    def get(self, image: np.ndarray) -> np.ndarray | None:
        """The stored (H, W) float32 map of ``image``, or None (not stored, or unreadable: then it is recomputed)."""
        path = self.path(image)
        try:
            with Image.open(path) as img:
                img.load()
                q = np.asarray(img)
        except FileNotFoundError:
            return None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            log.warning("saliency: stored map %s is unreadable (%s); computing it again", path, e)
            return None
        if q.shape != image.shape[:2] or q.dtype != np.uint16:
            log.warning("saliency: stored map %s is a %s %s array, not a %dx%d uint16 map; computing it again", path,
                        q.dtype, q.shape, image.shape[0], image.shape[1])
            return None
        return dequantize(q)

    def put(self, image: np.ndarray, sal: np.ndarray) -> None:
        """Store ``image``'s map (atomically). A cache that cannot be written (read-only, full) is reported once and
        then left alone: the run goes on computing its maps."""
        if not self.writable:
            return
        try:
            if not (self.dir / "model.json").is_file():
                atomic_write_json(self.dir / "model.json", self.identity)
            with atomic_path(self.path(image)) as tmp:
                Image.fromarray(quantize(sal)).save(tmp, format="PNG")
        except OSError as e:
            self.writable = False
            log.warning("saliency: cannot store maps in %s (%s); computing them without storing (set "
                        "saliency.cache_dir to a writable folder, or saliency.cache_maps=false)", self.dir, e)


__all__ = ["FORMAT", "MapCache", "cache_dir", "dequantize", "image_digest", "quantize"]
