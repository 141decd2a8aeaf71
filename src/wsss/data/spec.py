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
        # a bool is an int to Python: true would silently make class 1 the background
        if self.background is not None and (isinstance(self.background, bool) or not isinstance(self.background, int)):
            raise DataError(f"dataset spec '{self.name}': background must be a class index or None, got "
                            f"{self.background!r}")
        if self.background is not None and not 0 <= self.background < len(self.classes):
            raise DataError(f"dataset spec '{self.name}': background index {self.background} out of range")
        if not self.palette:
            object.__setattr__(self, "palette", tuple(voc_palette(len(self.classes))))
        elif len(self.palette) < len(self.classes):
            raise DataError(f"dataset spec '{self.name}': palette has {len(self.palette)} colours for "
                            f"{len(self.classes)} classes")

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
    bad = [c for c in raw["classes"] if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"dataset spec {path}: 'classes' must be a list of names, got {bad[0]!r} among them")
    classes = tuple(raw["classes"])
    bg = raw.get("background")
    if isinstance(bg, str):
        if bg not in classes:
            import difflib

            close = difflib.get_close_matches(bg, classes, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(f"dataset spec {path}: background '{bg}' is not in classes.{hint} Classes: "
                            f"{', '.join(classes)}")
        bg = classes.index(bg)
    elif isinstance(bg, bool) or (bg is not None and not isinstance(bg, int)):
        # true would be read as index 1 (MSRC-21: grass), silently; the background must be named
        raise DataError(f"dataset spec {path}: 'background' must be the background class's name (e.g. "
                        f"\"background\"), its index, or null when every labelled pixel is a class; got "
                        f"{json.dumps(bg)}")
    elif bg is not None and not 0 <= bg < len(classes):
        raise DataError(f"dataset spec {path}: 'background' index {bg} is out of range for {len(classes)} classes")
    ignore = raw.get("ignore_index", 255)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not len(classes) <= ignore <= 255:
        raise DataError(f"dataset spec {path}: 'ignore_index' must be an integer in {len(classes)}..255 (a mask value "
                        f"that is no class), got {json.dumps(ignore)}")
    palette_raw = raw.get("palette", [])
    if palette_raw is None:
        palette_raw = []
    if not isinstance(palette_raw, list) or not all(
            isinstance(p, list) and len(p) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                                       for v in p) for p in palette_raw):
        raise DataError(f"dataset spec {path}: 'palette' must be a list of [r, g, b] colours (integers 0..255), one "
                        "per class")
    palette = tuple(tuple(p) for p in palette_raw)
    if palette and len(palette) < len(classes):
        raise DataError(f"dataset spec {path}: 'palette' has {len(palette)} colours for {len(classes)} classes; give "
                        "one [r, g, b] per class, in class order, or leave it out (the VOC colour map)")
    name = raw.get("name", path.parent.name)
    return DatasetSpec(
        name=str(name),
        classes=classes,
        background=bg,
        ignore_index=ignore,
        palette=palette[: len(classes)],
    )


VOC_SPEC = DatasetSpec(name="voc12", classes=VOC_CLASSES, background=0)
