"""ACoL, Adversarial Complementary Learning (Zhang, Wei, Feng, Yang & Huang, "Adversarial Complementary Learning
for Weakly Supervised Object Localization", CVPR 2018).

Two classifier branches A and B share the backbone features. Branch A localizes as CAM does; its most
discriminative region (where A's max-normalised map exceeds ``erase_threshold``, the paper's delta) is erased from
the features that branch B sees, so B has to classify from the rest of the object. Both branches are trained with
the classification loss; the final map of a class is the element-wise maximum of the two branches' maps (the
paper's fusion). The erase mask is a constant for the backward pass (it depends on A only through a threshold,
which has no gradient).

Where we differ from the paper, and why:

- Which classes are erased. In training the paper erases the ground-truth class's region; our shared loop calls
  ``model(x)`` without labels, and the model must behave the same at inference. We erase the union of the regions
  of the classes that branch A predicts (sigmoid(logit_A) > ``select_threshold``, and always its top-1 class, so an
  unsure branch still erases something). Early in training that is a noisy set; once A classifies its training
  images (within an epoch or two here) it is the ground-truth set except for A's mistakes.
- Branch size. The paper's VGG branch is two 3x3 convs of 1024 channels + ReLU and a 1x1 conv to K. By default
  (``branch_channels: 0``) each of our branches is a CAM head, one bias-free 1x1 conv to K, so that ACoL differs from
  the CAM baseline by the second, erased branch alone. Measured on MSRC-21 (MobileNetV2, 5 epochs): with a hidden
  3x3 conv of 512 channels + ReLU both branches stayed at the all-negative loss (0.33) for 5 epochs and every map was
  zero (train map mIoU 31 against CAM's 52), also with the hidden conv at the backbone's learning rate; with 1x1
  branches branch A's loss falls like CAM's. ``branch_channels > 0`` restores the hidden layer (trained at the
  backbone's rate, see :meth:`ACoLClassifier.param_groups`).
- The loss is the mean of the two branches' losses (the paper sums them): the sum doubles the backbone's step at
  the shared ``train.lr`` (see wsss.methods.mdc for what n times the step did on MSRC-21).
- ``logits`` is the mean of the two branches' logits. Both are trained against the same targets, so the mean is a
  calibrated score (``maps.labels=pred`` thresholds its sigmoid) and Grad-CAM of it weighs both branches. The pooled
  fused map would not do: max(A, B) >= each branch, so its pooled score is biased upwards and never trained.
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


def selected_classes(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, K) bool: classes with sigmoid(logit) > ``threshold``, plus each image's top-1 class."""
    chosen = torch.sigmoid(logits) > threshold
    top1 = F.one_hot(logits.argmax(dim=1), logits.shape[1]).bool()
    return chosen | top1


def erase_mask(maps: torch.Tensor, selected: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """(B, 1, h, w) bool: pixels where any selected class's ReLU map, divided by its spatial max, exceeds
    ``threshold``. A class whose map is nowhere positive erases nothing."""
    m = torch.relu(maps.detach().float())
    norm = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(eps)
    return ((norm > threshold) & selected[:, :, None, None]).any(dim=1, keepdim=True)


def erase(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Features with the masked positions set to zero (every channel)."""
    return features.masked_fill(mask, 0.0)


class ACoLClassifier(BackboneModel):
    def __init__(self, backbone, num_classes: int, branch_channels: int, erase_threshold: float,
                 select_threshold: float, freeze_bn: bool = True):
        super().__init__(backbone, freeze_bn)
        self.erase_threshold, self.select_threshold = erase_threshold, select_threshold
        self.branch_a = self._branch(backbone.out_channels, branch_channels, num_classes)
        self.branch_b = self._branch(backbone.out_channels, branch_channels, num_classes)

    @staticmethod
    def _branch(c_in: int, hidden: int, k: int) -> nn.Sequential:
        """``hidden`` 0: the branch is a CAM head (one bias-free 1x1 conv); else 3x3 conv + ReLU + 1x1."""
        classifier = nn.Conv2d(hidden or c_in, k, 1, bias=False)
        # small initial logits, as the CAM head (wsss.models.classifier)
        nn.init.normal_(classifier.weight, std=0.01)
        if not hidden:
            return nn.Sequential(classifier)
        return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(inplace=True), classifier)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """The branches' hidden 3x3 convs train at the backbone's rate, only their 1x1 classifiers at the head's.
        At the head's 10x rate (0.1 on MSRC-21) the hidden ReLU layer on 1280 MobileNetV2 channels blows up in the
        first steps and its units die: both branches then sat at the all-negative loss (0.33) for 5 epochs and
        every map was zero (31 train mIoU against CAM's 52)."""
        groups = super().param_groups(lr, head_lr_mult)
        hidden = {id(p) for branch in (self.branch_a, self.branch_b) if len(branch) > 1 for p in branch[0].parameters()}
        moved = [p for p in groups[1]["params"] if id(p) in hidden]
        groups[1]["params"] = [p for p in groups[1]["params"] if id(p) not in hidden]
        groups[0]["params"] = groups[0]["params"] + moved
        return groups

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        cams_a = self.branch_a(feats)
        logits_a = cams_a.mean(dim=(2, 3))
        mask = erase_mask(cams_a, selected_classes(logits_a.detach().float(), self.select_threshold),
                          self.erase_threshold)
        cams_b = self.branch_b(erase(feats, mask))
        logits_b = cams_b.mean(dim=(2, 3))
        return {
            "logits": (logits_a + logits_b) / 2,
            "cams": torch.maximum(cams_a, cams_b),
            "logits_a": logits_a,
            "logits_b": logits_b,
            "erased": mask,
        }


@dataclass
class ACoLOptions:
    #: branch A's normalised map above this is erased for branch B (the paper's delta, about 0.6)
    erase_threshold: float = 0.6
    #: classes erased: sigmoid(logit_A) above this, and always A's top-1 class
    select_threshold: float = 0.5
    #: width of each branch's hidden 3x3 conv; 0 = none, the branch is a 1x1 CAM head (paper: two 3x3 convs of
    #: 1024 on VGG16; see the module docstring for why the default differs)
    branch_channels: int = 0

    def __post_init__(self):
        if not 0.0 <= self.erase_threshold < 1.0:
            raise ConfigError(f"method.options.erase_threshold: must be in [0, 1), got {self.erase_threshold}")
        if not 0.0 < self.select_threshold < 1.0:
            raise ConfigError(f"method.options.select_threshold: must be in (0, 1), got {self.select_threshold}")
        if self.branch_channels < 0:
            raise ConfigError(f"method.options.branch_channels: must be >= 0 (0 = a 1x1 CAM head per branch), got "
                              f"{self.branch_channels}")


@METHODS.register("acol")
class ACoL(Method):
    name = "acol"
    Options = ACoLOptions

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> nn.Module:
        o = self.options
        return ACoLClassifier(build_backbone(model_cfg), num_classes, o.branch_channels, o.erase_threshold,
                              o.select_threshold, freeze_bn=model_cfg.freeze_bn)

    def loss(self, out, batch):
        la = F.multilabel_soft_margin_loss(out["logits_a"].float(), batch["labels"])
        lb = F.multilabel_soft_margin_loss(out["logits_b"].float(), batch["labels"])
        return (la + lb) / 2, {"cls_a": float(la.detach()), "cls_b": float(lb.detach())}
