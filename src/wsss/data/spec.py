"""Dataset specs: class names, palette, background policy and ignore index.

A mask value is an index into ``classes``; ``ignore_index`` (255) marks unlabelled pixels. A dataset either has a
background class (PASCAL VOC, COCO: index 0) or none (MSRC-21: every labelled pixel is a class). Image-level labels
are always over the *foreground* classes, i.e. every class but the background; the classifier has one output per
foreground class.

``remap_to_background`` turns some classes into background, e.g. MSRC-21's stuff classes (grass, sky, ...) to get a
VOC-like object/background task. It returns a new spec plus a look-up table applied to every mask on load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.errors import ConfigError, DataError


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), used as the default palette of any spec."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    #: name of each mask value 0..n-1
    classes: tuple[str, ...]
    #: index of the background class in ``classes``, or None when every labelled pixel is a class
    background: int | None
    ignore_index: int = 255
    palette: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self):
        if len(self.classes) == 0:
            raise DataError(f"dataset spec '{self.name}' has no classes")
        if len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise DataError(f"dataset spec '{self.name}' lists classes twice: {dup}")
        if len(self.classes) >= self.ignore_index:
            raise DataError(f"dataset spec '{self.name}': {len(self.classes)} classes collide with ignore index {self.ignore_index}")
        if self.background is not None and not 0 <= self.background < len(self.classes):
            raise DataError(f"dataset spec '{self.name}': background index {self.background} out of range")
        if not self.palette:
            object.__setattr__(self, "palette", tuple(voc_palette(len(self.classes))))

    @property
    def num_classes(self) -> int:
        """Number of mask classes (background included)."""
        return len(self.classes)

    @property
    def fg_ids(self) -> tuple[int, ...]:
        """Mask values of the foreground classes, in classifier-output order."""
        return tuple(i for i in range(len(self.classes)) if i != self.background)

    @property
    def fg_names(self) -> tuple[str, ...]:
        return tuple(self.classes[i] for i in self.fg_ids)

    @property
    def num_fg(self) -> int:
        return len(self.fg_ids)

    def class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            import difflib

            close = difflib.get_close_matches(name, self.classes, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"class '{name}' is not a class of dataset '{self.name}'.{hint} Its classes: {', '.join(self.classes)}"
            ) from None

    def palette_bytes(self) -> bytes:
        flat = [v for rgb in self.palette for v in rgb]
        flat += [0] * (768 - len(flat))
        # ignore pixels are drawn white, as in VOC
        flat[3 * self.ignore_index : 3 * self.ignore_index + 3] = [255, 255, 255]
        return bytes(flat[:768])

    def remap_to_background(self, names: Sequence[str]) -> tuple[DatasetSpec, np.ndarray]:
        """New spec where ``names`` are background (index 0), plus a uint8 LUT old value -> new value.

        Values that are neither a class nor the ignore index map to 254 in the LUT so that validation can still
        name them after remapping.
        """
        lut = np.full(256, 254, dtype=np.uint8)
        lut[self.ignore_index] = self.ignore_index
        if not names:
            lut[: self.num_classes] = np.arange(self.num_classes)
            return self, lut
        drop = {self.class_index(n) for n in names}
        if self.background is not None:
            drop.add(self.background)
        kept = [i for i in range(self.num_classes) if i not in drop]
        if not kept:
            raise ConfigError(f"data.to_background maps every class of '{self.name}' to background")
        for i in drop:
            lut[i] = 0
        for new, old in enumerate(kept, start=1):
            lut[old] = new
        palette = ((0, 0, 0),) + tuple(self.palette[i] for i in kept)
        spec = DatasetSpec(
            name=f"{self.name}-objects",
            classes=("background",) + tuple(self.classes[i] for i in kept),
            background=0,
            ignore_index=self.ignore_index,
            palette=palette,
        )
        return spec, lut

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "background": None if self.background is None else self.classes[self.background],
            "ignore_index": self.ignore_index,
            "palette": [list(p) for p in self.palette],
        }


def spec_from_json(path: str | Path) -> DatasetSpec:
    """Read a ``dataset.json``: ``classes`` (list), ``background`` (a class name, an index, or null),
    ``ignore_index`` (default 255), ``palette`` (optional list of [r, g, b])."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"dataset spec {path} does not exist") from None
    except ValueError as e:
        raise DataError(f"dataset spec {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list):
        raise DataError(f"dataset spec {path}: needs a 'classes' list")
    classes = tuple(str(c) for c in raw["classes"])
    bg = raw.get("background")
    if isinstance(bg, str):
        if bg not in classes:
            raise DataError(f"dataset spec {path}: background '{bg}' is not in classes")
        bg = classes.index(bg)
    elif bg is not None and not isinstance(bg, int):
        raise DataError(f"dataset spec {path}: background must be a class name, an index or null")
    palette = tuple(tuple(int(v) for v in p) for p in raw.get("palette", []))
    if palette and len(palette) < len(classes):
        raise DataError(f"dataset spec {path}: palette has {len(palette)} colours for {len(classes)} classes")
    return DatasetSpec(
        name=str(raw.get("name", path.parent.name)),
        classes=classes,
        background=bg,
        ignore_index=int(raw.get("ignore_index", 255)),
        palette=palette[: len(classes)],
    )


VOC_SPEC = DatasetSpec(name="voc12", classes=VOC_CLASSES, background=0)
