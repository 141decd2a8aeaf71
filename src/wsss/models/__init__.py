"""Backbones (torchvision feature extractors) and the CAM classifier."""

from wsss.models.backbones import BACKBONES, build_backbone
from wsss.models.classifier import CAMClassifier

__all__ = ["BACKBONES", "CAMClassifier", "build_backbone"]
