"""MDC, multi-dilated convolution (Wei, Xiao, Shi, Jie, Feng & Huang, "Revisiting Dilated Convolution: A Simple
Approach for Weakly- and Semi-Supervised Semantic Segmentation", CVPR 2018).

Parallel 3x3 convolution heads with dilation rates ``dilations`` (paper: 1, 3, 6, 9) read the backbone features.
A larger rate transfers the discriminative evidence to farther pixels, so the dilated heads light up more of the
object. Every head is globally pooled and trained with its own classification loss (their mean is the loss). The
localization map is the paper's combination

    H = H_1 + (1 / n_d) * sum_{d > 1} H_d

(the d = 1 map plus the mean of the dilated ones; averaging keeps the false positives that any single dilated head
adds from dominating). ``cams`` = H; ``logits`` = the spatial mean of H, which equals logit_1 + mean of the dilated
heads' logits because every head is linear and pooled by the mean; Grad-CAM back-propagates it.

Where we differ from the paper, and why:

- Each head is a single bias-free 3x3 dilated conv straight to the K classes (a CAM head with a dilated kernel). The
  paper's block is a dilated conv layer followed by pooling and a classifier; going straight to K keeps each head's
  map exactly its CAM (linear and bias-free, so the pooled map is the logit) and costs K / C of a wide block on our
  1280-channel backbone output.
- The loss is the *mean* of the heads' losses (the paper sums them). Under the shared ``train.lr`` the sum makes the
  backbone's step about n_d times the CAM baseline's (the heads' gradients are strongly correlated); measured on
  MSRC-21 (MobileNetV2, lr 0.01, 5 epochs) every head then stayed near the all-negative loss (0.33-0.35) and the
  maps were zero (train map mIoU 31 against CAM's 52). The mean gives each head the same gradient direction at
  1/n_d of the scale, i.e. the paper's recipe at the baseline's backbone step.
- The paper applies the heads to VGG16 conv5 features; we apply them to whatever backbone output the config sets
  (output stride 16 or 32). At stride 32 and small crops the widest rates reach mostly padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method
from wsss.models import build_backbone
from wsss.models.classifier import BackboneModel


def combine_maps(head_maps: torch.Tensor) -> torch.Tensor:
    """(B, n, K, h, w) maps of the heads, the d = 1 head first -> (B, K, h, w) = H_1 + mean of the others
    (just H_1 when there is no dilated head)."""
    if head_maps.shape[1] == 1:
        return head_maps[:, 0]
    return head_maps[:, 0] + head_maps[:, 1:].mean(dim=1)


class MDCClassifier(BackboneModel):
    def __init__(self, backbone, num_classes: int, dilations: tuple[int, ...], freeze_bn: bool = True):
        super().__init__(backbone, freeze_bn)
        # the d = 1 head first: combine_maps relies on it
        self.dilations = tuple(sorted(dilations))
        self.heads = nn.ModuleList(
            nn.Conv2d(backbone.out_channels, num_classes, 3, padding=d, dilation=d, bias=False) for d in self.dilations
        )
        for h in self.heads:
            # small initial logits, as the CAM head (wsss.models.classifier)
            nn.init.normal_(h.weight, std=0.01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        head_maps = torch.stack([h(feats) for h in self.heads], dim=1)  # (B, n, K, h, w)
        cams = combine_maps(head_maps)
        return {"logits": cams.mean(dim=(2, 3)), "cams": cams, "head_logits": head_maps.mean(dim=(3, 4))}


@dataclass
class MDCOptions:
    #: dilation rates of the parallel 3x3 heads; must include 1 (the paper: 1, 3, 6, 9)
    dilations: tuple[int, ...] = (1, 3, 6, 9)

    def __post_init__(self):
        d = list(self.dilations)
        if 1 not in d or any(r < 1 for r in d) or len(set(d)) != len(d):
            raise ConfigError(f"method.options.dilations: distinct rates >= 1 that include 1, got {d}")


@METHODS.register("mdc")
class MDC(Method):
    name = "mdc"
    Options = MDCOptions

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> nn.Module:
        return MDCClassifier(build_backbone(model_cfg), num_classes, self.options.dilations,
                             freeze_bn=model_cfg.freeze_bn)

    def loss(self, out, batch):
        head_logits = out["head_logits"].float()  # (B, n, K)
        dilations = sorted(self.options.dilations)
        losses = [F.multilabel_soft_margin_loss(head_logits[:, i], batch["labels"]) for i in range(len(dilations))]
        parts = {f"cls_d{d}": float(v.detach()) for d, v in zip(dilations, losses)}
        return torch.stack(losses).mean(), parts
