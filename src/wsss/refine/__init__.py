"""Refinement of localization maps: the dense CRF (Krähenbühl & Koltun, NIPS 2011) as used in WSSS."""

from wsss.refine.crf import check_crf_config, crf_job, crf_pseudo_mask, dense_crf, maps_to_probs, refine_many

__all__ = ["check_crf_config", "crf_job", "crf_pseudo_mask", "dense_crf", "maps_to_probs", "refine_many"]
