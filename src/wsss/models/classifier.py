"""The CAM classifier: backbone -> bias-free 1x1 conv (one channel per class) -> global average pooling.

Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016. Because the head is linear and
bias-free, applying it before pooling gives the class activation maps of *all* classes in one pass; the logits are
their spatial mean (identical to pooling first, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from wsss.models.backbones import Backbone


class BackboneModel(nn.Module):
    """A pretrained backbone plus a new head: optional frozen BatchNorm in the backbone (batches of 8-16 are too small
    to estimate its statistics), and two learning-rate groups (backbone at ``lr``, new layers at ``lr * mult``)."""

    def __init__(self, backbone: Backbone, freeze_bn: bool = True):
        super().__init__()
        self.backbone = backbone.body
        self.stages = backbone.stages
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self._backbone_bn():
                for p in m.parameters():
                    p.requires_grad_(False)

    def _backbone_bn(self):
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self._backbone_bn():
                m.eval()
        return self

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [
            {"params": backbone, "lr": lr, "base_lr": lr},
            {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult},
        ]


class CAMClassifier(BackboneModel):
    def __init__(self, backbone: Backbone, num_classes: int, freeze_bn: bool = True):
        super().__init__(backbone, freeze_bn)
        self.head = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        # small initial logits: a fan-out init on 1280+ channels starts the soft-margin loss near 5 and
        # destabilises the 10x head learning rate
        nn.init.normal_(self.head.weight, std=0.01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation maps of every class, (B, K, h, w)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cams = self.cam(self.features(x))
        return {"logits": cams.mean(dim=(2, 3)), "cams": cams}
