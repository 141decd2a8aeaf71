"""Refiners: localization maps -> refined maps or pseudo masks, registered by name and chained by the pseudo stage
(``pseudo.refiners``); see :mod:`wsss.refine.base`. ``crf``: the dense CRF (Krähenbühl & Koltun, NIPS 2011);
``saliency``: saliency-guided masks (Oh et al., CVPR 2017); ``irn``: IRN's inter-pixel relations (Ahn, Cho & Kwak,
CVPR 2019) and ``psa``: PSA's AffinityNet (Ahn & Kwak, CVPR 2018), random walks of the maps on affinities learned
from the maps (:mod:`wsss.refine.affinity`, :mod:`wsss.refine.relations`, :mod:`wsss.refine.random_walk`)."""

# importing a refiner module registers it
from wsss.refine import crf, irn, psa, saliency  # noqa: F401
from wsss.refine.base import (
    MAPS,
    MASK,
    REFINERS,
    Item,
    Refiner,
    Selection,
    build_chain,
    finish_chain,
    refine_many,
    resolve_refiners,
    through,
)
from wsss.refine.crf import (
    check_crf_config,
    crf_job,
    crf_pseudo_mask,
    crf_refine_mask,
    dense_crf,
    maps_to_probs,
    mask_probs,
)
from wsss.refine.saliency import check_saliency_config, fuse

__all__ = [
    "MAPS", "MASK", "REFINERS", "Item", "Refiner", "Selection", "build_chain", "check_crf_config",
    "check_saliency_config", "crf_job", "crf_pseudo_mask", "crf_refine_mask", "dense_crf", "finish_chain", "fuse",
    "mask_probs", "maps_to_probs", "refine_many", "resolve_refiners", "through",
]
