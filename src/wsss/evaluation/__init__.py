"""Metrics (one confusion matrix per split), average precision, threshold sweeps, trivial baselines
(:mod:`wsss.evaluation.baselines`)."""

from wsss.evaluation.metrics import average_precision, confusion_matrix, segmentation_scores
from wsss.evaluation.sweep import ThresholdSweep

__all__ = ["ThresholdSweep", "average_precision", "confusion_matrix", "segmentation_scores"]
