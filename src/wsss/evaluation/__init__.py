"""Metrics (one confusion matrix per split), average precision, threshold sweeps."""

from wsss.evaluation.metrics import average_precision, confusion_matrix, segmentation_scores
from wsss.evaluation.sweep import ThresholdSweep

__all__ = ["ThresholdSweep", "average_precision", "confusion_matrix", "segmentation_scores"]
