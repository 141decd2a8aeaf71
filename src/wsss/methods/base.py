"""The method plugin interface: what a classifier-training recipe may change.

A method answers four questions and nothing else: what it adds to the model (``build_model``), to the batch
(``transform_batch``; a method that sets ``uses_saliency`` also gets each image's saliency map in it), to the loss
(``loss``), and which model output holds the localization maps (``maps``).
The training loop, checkpoints, devices, precision and multi-scale inference are shared and live elsewhere.
Options are a dataclass per method, validated and filled in with every default at load
(:meth:`Method.resolve_options`, called by :func:`wsss.config.load_config`): an option another method owns is rejected
with the nearest name and this method's own option list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.config.typed import build, to_dict
from wsss.errors import ConfigError
from wsss.models import CAMClassifier, build_backbone
from wsss.registry import Registry


@dataclass
class NoOptions:
    pass


class Method:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: the method learns from saliency: each training batch then has ``"saliency"``, (B, 1, H, W) in [0, 1], the
    #: ``saliency`` source's map of each image through the image's own rescale, flip and crop
    #: (:data:`wsss.data.transforms.SALIENCY_IGNORE` where the crop padded); the saliency settings then key the
    #: classifier, and a source trained on pixel masks makes the run's figures "I+S"
    uses_saliency: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any] | None = None, *, has_background: bool | None = None):
        #: whether the dataset has a background class (None = not known, e.g. a method built outside a run); a
        #: method whose recipe differs with and without background reads it instead of asking the user
        self.has_background = has_background
        self.options = self._options(options)

    @classmethod
    def _options(cls, options: Mapping[str, Any] | None) -> Any:
        valid = [f.name for f in dataclasses.fields(cls.Options)]
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"method.options: expected a mapping of option: value, got {options!r} (method "
                              f"'{cls.name}' takes: {', '.join(valid) or 'no options'})")
        try:
            return build(cls.Options, dict(options or {}), "method.options")
        except ConfigError as e:
            raise ConfigError(f"{e} (method '{cls.name}' takes: {', '.join(valid) or 'no options'})") from None

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``options`` checked and with every default filled in, as a plain dict (what ``method.options`` holds once
        a config is loaded, so ``{}`` and the spelled-out defaults are one config). Needs no dataset: settings that
        default from it (``has_background``) keep their "from the dataset" value and are resolved in ``__init__``."""
        return to_dict(cls._options(options))

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ConfigError when other settings of the run cannot serve this method (checked at load, before any
        data is read); the default accepts any."""

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> nn.Module:
        return CAMClassifier(build_backbone(model_cfg), num_classes, freeze_bn=model_cfg.freeze_bn)

    def transform_batch(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def loss(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.multilabel_soft_margin_loss(out["logits"].float(), batch["labels"])
        return loss, {"cls": float(loss.detach())}


METHODS: Registry[type[Method]] = Registry("method")


def build_method(name: str, options: dict | None = None, *, has_background: bool | None = None) -> Method:
    """The registered method ``name`` with its options; ``has_background``: whether the run's dataset has a
    background class (pass ``spec.background is not None``)."""
    return METHODS.get(name)(options, has_background=has_background)
