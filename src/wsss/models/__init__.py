"""Backbones (torchvision feature extractors) and the CAM classifier."""

# importing a backbone module registers its builders; vit registers the timm ViT / DeiT backbones (vit_tiny,
# vit_small, deit_small, ...; timm itself is imported lazily)
from wsss.models import vit  # noqa: F401
from wsss.models.backbones import BACKBONES, build_backbone
from wsss.models.classifier import CAMClassifier

__all__ = ["BACKBONES", "CAMClassifier", "build_backbone"]
