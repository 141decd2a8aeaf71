"""The saliency-source interface and its registry.

A saliency source maps an image to a per-pixel "how much does this stand out as an object" score:
``source(image, sample) -> (H, W) float32 in [0, 1]``, where ``image`` is the **uint8 RGB** image as loaded
(:func:`wsss.data.io.load_image`) and ``sample`` its :class:`wsss.data.readers.Sample` (a source that reads
precomputed maps needs its id). Sources are registered by name in :data:`SALIENCY_SOURCES` and built from the
``saliency`` config section by :func:`build_source`; each validates its own ``saliency.*`` options at construction,
with a :class:`~wsss.errors.ConfigError` naming the key.

:meth:`SaliencySource.__call__` is the one place that enforces the contract (input an HxWx3 uint8 image, output an
image-sized finite map in [0, 1]), so a source only says how its map is computed. It is also where a model source's
maps (:attr:`SaliencySource.stores_maps`: seconds per image) are read from and written to the saliency cache
(:mod:`wsss.saliency.cache`), so each image's map is computed once; :meth:`SaliencySource.precompute` fills the cache
for a list of images up front, with a progress bar.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import numpy as np

from wsss.config.schema import SaliencyConfig
from wsss.registry import Registry
from wsss.saliency.cache import MapCache, cache_dir, dequantize, quantize

log = logging.getLogger("wsss.saliency")

#: settings of the saliency section that every source's output depends on (through the fusion)
COMMON_OPTIONS = ("source", "threshold", "ignore_band", "min_cam")


class SaliencySource:
    """Base class: subclasses set :attr:`options` and implement :meth:`compute`."""

    #: the ``saliency.*`` keys this source reads; with :meth:`fingerprint` they enter the pseudo stage key
    options: tuple[str, ...] = ()
    #: a model source: its maps are quantised to 16 bits and, with ``saliency.cache_maps``, stored per image under
    #: :meth:`identity` and read back by later runs (:mod:`wsss.saliency.cache`)
    stores_maps: ClassVar[bool] = False
    #: whether the source learned from pixel labels (a salient-object network trained on DUTS): figures that use it
    #: are "image labels + saliency" (I+S) in metrics.json and the report; a fixed image transform sets False
    pixel_supervised: ClassVar[bool] = True

    def __init__(self, cfg: SaliencyConfig):
        self.cfg = cfg
        self._maps: MapCache | None = None

    def identity(self) -> dict:
        """What, besides the image, determines the maps of a :attr:`stores_maps` source (the model file's sha256, its
        settings); JSON-able."""
        raise NotImplementedError

    @property
    def map_cache(self) -> MapCache | None:
        """Where this source's maps are stored; None when it stores none."""
        if not (self.stores_maps and self.cfg.cache_maps):
            return None
        if self._maps is None:
            self._maps = MapCache(cache_dir(self.cfg.cache_dir), {"source": self.cfg.source, **self.identity()})
        return self._maps

    def compute(self, image: np.ndarray, sample: Any) -> np.ndarray:
        """(H, W) saliency of ``image`` (HxWx3 uint8 RGB); any float dtype; values in [0, 1]."""
        raise NotImplementedError

    def check(self, samples: Sequence[Any]) -> None:
        """Raise (before any expensive work) if some of ``samples`` cannot get a map. Default: every image can."""

    @classmethod
    def check_settings(cls, cfg: SaliencyConfig) -> None:
        """Raise :class:`ConfigError` naming the key when a setting this source cannot do without is unset; cheap
        (opens no file), so a config can be checked at load. The constructor calls it too. Default: needs none."""

    @classmethod
    def fingerprint(cls, cfg: SaliencyConfig) -> dict:
        """What identifies the files this source reads (for stage keys); cheap, and never raises."""
        return {}

    def precompute(self, samples: Sequence[Any], progress: bool = True) -> int:
        """Compute and store the map of every sample not stored yet (a :attr:`stores_maps` source with
        ``saliency.cache_maps``), with a progress bar; returns how many were computed. Other sources do nothing here:
        their maps are computed when asked for. An interrupted call keeps the maps it stored."""
        cache = self.map_cache
        if cache is None or not samples:
            return 0
        from tqdm import tqdm

        from wsss.data.io import load_image

        done = 0
        for s in tqdm(samples, desc=f"saliency {self.cfg.source}", unit="img", leave=False, disable=not progress,
                      mininterval=1.0):
            image = load_image(s.image)
            if not cache.has(image):
                self(image, s)
                done += 1
        log.info("saliency %s: %d maps computed, %d already stored in %s", self.cfg.source, done, len(samples) - done,
                 cache.dir)
        return done

    def __call__(self, image: np.ndarray, sample: Any = None) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise TypeError(f"saliency: the image must be an HxWx3 uint8 RGB array (as loaded), got {what}")
        cache = self.map_cache
        if cache is not None and (stored := cache.get(image)) is not None:
            return stored
        out = np.asarray(self.compute(image, sample), dtype=np.float32)
        name = type(self).__name__
        if out.shape != image.shape[:2]:
            raise ValueError(f"saliency source {name} returned a map of shape {out.shape} for a "
                             f"{image.shape[0]}x{image.shape[1]} (HxW) image")
        if not np.isfinite(out).all():
            raise ValueError(f"saliency source {name} returned non-finite values")
        # tolerate rounding just outside [0, 1] (resampling); anything further is a bug in the source
        if out.size and (out.min() < -1e-3 or out.max() > 1 + 1e-3):
            raise ValueError(f"saliency source {name} returned values in [{out.min():.4g}, {out.max():.4g}], "
                             "outside [0, 1]")
        out = np.clip(out, 0.0, 1.0)
        if self.stores_maps:  # the same map whether it is stored and read back or not
            out = dequantize(quantize(out))
            if cache is not None:
                cache.put(image, out)
        return out


SALIENCY_SOURCES: Registry[type[SaliencySource]] = Registry("saliency source")


def build_source(cfg: SaliencyConfig) -> SaliencySource:
    """The source named by ``cfg.source``, its options validated (ConfigError naming the key)."""
    return SALIENCY_SOURCES.get(cfg.source)(cfg)


def source_key(cfg: SaliencyConfig) -> dict:
    """What determines the maps themselves: the source's name, its own options and its file fingerprint (for the
    key of a stage that reads the maps, such as a classifier trained with saliency). An unknown source is keyed by
    its name only (building the source reports it)."""
    out: dict[str, Any] = {"source": cfg.source}
    if cfg.source in SALIENCY_SOURCES:
        cls = SALIENCY_SOURCES.get(cfg.source)
        d = asdict(cfg)
        out.update({k: d[k] for k in cls.options})
        out["files"] = cls.fingerprint(cfg)
    return out


def saliency_key(cfg: SaliencyConfig) -> dict:
    """The saliency settings that change pseudo masks (for the pseudo stage key): the common ones, the chosen
    source's own options and its file fingerprint (:func:`source_key`)."""
    d = asdict(cfg)
    return {**source_key(cfg), **{k: d[k] for k in COMMON_OPTIONS}}


class StoredSaliency:
    """A source's maps where the source itself should not go: data-loader workers and spawned training processes.

    Picklable and cheap to copy (no model session): a model source's maps are read from its saliency cache, where
    :meth:`SaliencySource.precompute` put them once; any other source (a fixed image transform, a folder of PNGs) is
    light and is asked directly. A map missing from the cache (a cache that could not be written) is computed by the
    source, built in the process that needs it."""

    def __init__(self, source: SaliencySource):
        self.cfg = source.cfg
        self.cache = source.map_cache
        self._source: SaliencySource | None = None if source.stores_maps else source

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if state["_source"] is not None and state["_source"].stores_maps:
            state["_source"] = None  # built again where it is needed
        return state

    def __call__(self, image: np.ndarray, sample: Any = None) -> np.ndarray:
        if self.cache is not None and (stored := self.cache.get(image)) is not None:
            return stored
        if self._source is None:
            self._source = build_source(self.cfg)
        return self._source(image, sample)
