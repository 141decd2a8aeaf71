"""DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017) on a wsss backbone.

The ASPP head is torchvision's own ``DeepLabHead``; the backbone is any registered one at output stride 16 (torchvision
ships DeepLabV3 only on ResNet and MobileNetV3, so the head is put on our backbone rather than re-implemented). Logits
are upsampled bilinearly to the input size. The network is configured by ``seg.model``: the backbone settings of
``model`` (initial weights, frozen BatchNorm) plus the ASPP rates.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from wsss.config.schema import SegModelConfig
from wsss.models.backbones import build_backbone
from wsss.models.classifier import BackboneModel


class DeepLabV3(BackboneModel):
    def __init__(self, cfg: SegModelConfig, num_classes: int):
        backbone = build_backbone(cfg)
        super().__init__(backbone, freeze_bn=cfg.freeze_bn)
        self.head = DeepLabHead(backbone.out_channels, num_classes)
        # torchvision's head is built for output stride 8 (rates 12/24/36); at stride 16 the paper uses 6/12/18
        self.head[0] = ASPP(backbone.out_channels, list(cfg.atrous_rates))
        _pooling_branch_groupnorm(self.head[0])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.head(self.backbone(x))
        # upsampled in fp32: under bf16 autocast the backward of the upsampling sums hundreds of per-pixel gradients
        # per feature cell in bf16 (8-bit mantissa), loses them, and the network stops learning (CE stuck at 2.7)
        # "logits_low": at the head's resolution, for losses computed below the input size (SEC)
        return {"logits": F.interpolate(low.float(), size=x.shape[-2:], mode="bilinear", align_corners=False),
                "logits_low": low}


def _pooling_branch_groupnorm(aspp: ASPP, groups: int = 32) -> None:
    """Where we differ from DeepLabV3: the image-pooling branch of ASPP normalises a single value per image and
    channel, so with the batches of 2-8 that fit a CPU its BatchNorm statistics are noise and eval-mode predictions
    collapse (seen: 7 % mIoU on images the network fitted). GroupNorm there normalises over channels instead; the
    other BatchNorms of the head see B x H x W values and stay."""
    pooling = aspp.convs[-1]
    for i, m in enumerate(pooling):
        if isinstance(m, nn.BatchNorm2d):
            pooling[i] = nn.GroupNorm(min(groups, m.num_features), m.num_features)


def seg_meta(cfg: SegModelConfig, classes) -> dict:
    """What a segmentation checkpoint must match to be loaded into the network ``seg.model`` builds."""
    return {"seg_backbone": cfg.backbone, "output_stride": cfg.output_stride, "classes": list(classes)}


@torch.no_grad()
def predict_probs(model, image: torch.Tensor, scales=(1.0,), flip: bool = True) -> torch.Tensor:
    """Softmax averaged over scales (and mirrored views), at the image's size: (B, C, H, W)."""
    h, w = image.shape[-2:]
    acc, n = None, 0
    for s in scales:
        x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        views = torch.cat([x, x.flip(-1)]) if flip else x
        p = model(views)["logits"].float()
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        b = image.shape[0]
        p = p[:b] + p[b:].flip(-1) if flip else p
        acc = p if acc is None else acc + p
        n += 2 if flip else 1
    return acc / n
