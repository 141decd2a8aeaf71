"""Saliency as a cue for object extent: saliency sources and the saliency-guided pseudo masks of Oh et al. (CVPR
2017), used by the pseudo stage with ``pseudo.method: saliency``.

Sources (registry :data:`SALIENCY_SOURCES`, built by :func:`build_source` from the ``saliency`` config section):
``spectral_residual`` (default, needs no file), ``frequency_tuned``, ``onnx`` (a salient-object model file),
``folder`` (precomputed PNG maps). Fusion: :func:`fuse`, :class:`SaliencySweep`.
"""

from wsss.saliency import classical, folder, onnx_model  # noqa: F401  (register the sources)
from wsss.saliency.base import SALIENCY_SOURCES, SaliencySource, build_source, saliency_key
from wsss.saliency.classical import frequency_tuned, spectral_residual
from wsss.saliency.fusion import (
    SaliencySweep,
    check_saliency_config,
    fuse,
    fused_crf_job,
    fused_mask_job,
    image_and_saliency,
)

__all__ = [
    "SALIENCY_SOURCES", "SaliencySource", "SaliencySweep", "build_source", "check_saliency_config",
    "frequency_tuned", "fuse", "fused_crf_job", "fused_mask_job", "image_and_saliency", "saliency_key",
    "spectral_residual",
]
