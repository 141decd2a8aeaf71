"""Affinity refiners: the plugin side shared by IRN (:mod:`wsss.refine.irn`) and PSA (:mod:`wsss.refine.psa`).

An affinity refiner takes maps and gives maps: the maps after a random walk (:mod:`wsss.refine.random_walk`) whose
transition comes from a network trained on the run's own maps (:mod:`wsss.refine.relations`). The threshold /
arg-max rule, or a refiner after it (``[irn, crf]``), turns the walked maps into a mask; for a dataset with a
background class the background threshold is then chosen on the selection split (val) on the walked maps, as for
any chain (:mod:`wsss.stages.pseudo`).

**The network** (:class:`AffinityNet`): a frozen backbone's multi-level features -- the last backbone stage at each
stride from ``feature_stride`` on (:class:`FrozenFeatures`) -- and a head that alone is trained. ``backbone:
classifier`` (default) takes the run's trained classifier's backbone, its weights read from the ``cls`` stage;
any registered CNN backbone name takes that backbone with its ImageNet weights at output stride 16 (IRN's
ResNet-50). The head's output lives on the grid ``ceil(H / feature_stride) x ceil(W / feature_stride)``.

**The stage** (:meth:`AffinityRefiner.stages`): one cached stage named after the refiner (``runs/<name>/irn/``,
``runs/<name>/psa/``), declared to the pipeline through :meth:`wsss.refine.base.Refiner.stages`. It reads the
``maps`` stage (and ``cls`` for the classifier's backbone), is keyed by the settings that change the network (the
training options, the ``crf`` kernels of the confident regions, the runtime's numerics, the seed; not the walk's
``radius``, ``beta``, ``steps``), and holds ``labels/<id>.png`` (the confident regions), ``last.ckpt`` (resume),
``log.jsonl`` and ``model.pt``. :meth:`AffinityRefiner.prepare` loads ``model.pt`` from it.

**The walk** of one image (:meth:`AffinityRefiner.refine`): the network on the whole image, the affinities of the
half neighbourhood of ``radius`` on its grid, the maps average-pooled to the grid (edge-replicated to a multiple of
the stride), ``steps`` steps of the transition with exponent ``beta``, and the result upsampled by the stride
(bilinear) and cropped back to the image, as IRN does. The maps leave the walk normalised by their maximum over all
classes (IRN), so a background threshold keeps IRN's meaning (IRN: 0.25).

A subclass says only what its paper adds: ``Options`` (the paper's settings as defaults), the head
(:meth:`~AffinityRefiner.build_head`), how pair affinities are read from the network's output
(:meth:`~AffinityRefiner.pair_affinity`), the background scores of its confident regions
(:meth:`~AffinityRefiner.background_scores`) and how maps enter and leave the walk (:meth:`~AffinityRefiner.walk`).

Transformer backbones are refused at load: the head reads spatial CNN stages at several strides.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.runtime import autocast as runtime_autocast
from wsss.config.schema import ModelConfig
from wsss.config.typed import to_dict
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import to_tensor
from wsss.errors import ConfigError
from wsss.layout import CLS, MAPS
from wsss.methods.seam import capture_outputs, probe_stages
from wsss.models.backbones import BACKBONES, build_backbone, check_weights, is_transformer
from wsss.refine.base import MAPS as MAPS_KIND
from wsss.refine.base import Item, Refiner
from wsss.refine.crf import check_crf_config
from wsss.refine.random_walk import Offset, half_offsets, random_walk
from wsss.runs import Stage
from wsss.stages.declare import StageDecl

log = logging.getLogger("wsss.refine")

#: ``backbone`` option: the run's trained classifier's backbone
CLASSIFIER = "classifier"
#: output stride of a registered backbone named by the ``backbone`` option (IRN's ResNet-50: strides 2, 2, 2, 1)
REGISTERED_OUTPUT_STRIDE = 16


def check_backbone_option(value: str, key: str) -> None:
    """``value`` is ``classifier`` or a registered CNN backbone; ConfigError naming ``key`` otherwise."""
    if value == CLASSIFIER:
        return
    if value not in BACKBONES:
        BACKBONES.get(value, key=key)  # raises with the nearest name
    if is_transformer(value):
        raise ConfigError(f"{key}: '{value}' is a vision transformer; the affinity head reads spatial CNN stages at "
                          f"several strides. Use '{CLASSIFIER}' (a CNN classifier) or a CNN backbone")


# -- the network -----------------------------------------------------------------------------------------------------


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``x`` (B, C, h, w) to ``size`` (no-op when it already has it)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FrozenFeatures(nn.Module):
    """A backbone body, frozen (eval mode, no gradients), giving the output of its last stage at each stride from
    ``stride`` on, shallow to deep."""

    def __init__(self, body: nn.Module, stages: Sequence[str], stride: int):
        super().__init__()
        self.body = body
        for p in body.parameters():
            p.requires_grad_(False)
        info = probe_stages(body, stages)
        last: dict[int, str] = {}
        for name in stages:  # in order: the last stage at a stride wins
            if info[name][1] >= stride:
                last[info[name][1]] = name
        if not last:
            raise ConfigError(f"the backbone has no stage at stride {stride} or coarser (its stages: "
                              f"{', '.join(f'{n}:{info[n][1]}' for n in stages)})")
        self.levels = [last[s] for s in sorted(last)]
        self.channels = [info[n][0] for n in self.levels]
        self.body.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # frozen statistics too
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad(), capture_outputs(self.body, self.levels) as out:
            self.body(x)
        return [out[n] for n in self.levels]


class AffinityNet(nn.Module):
    """Frozen features and the head a refiner trains; ``forward(x)`` gives the head's outputs on the grid
    ``ceil(H / stride) x ceil(W / stride)``."""

    def __init__(self, features: FrozenFeatures, head: nn.Module, stride: int):
        super().__init__()
        self.features, self.head, self.stride = features, head, int(stride)

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return math.ceil(x.shape[-2] / self.stride), math.ceil(x.shape[-1] / self.stride)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.features(x), self.grid(x))

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """One group: the head at ``lr * head_lr_mult`` (the backbone does not train)."""
        lr = lr * head_lr_mult
        return [{"params": [p for p in self.head.parameters() if p.requires_grad], "lr": lr, "base_lr": lr}]


def to_grid(scores: torch.Tensor, stride: int, grid: Sequence[int]) -> torch.Tensor:
    """(C, H, W) -> (C, h, w): edge-replicated to ``grid * stride``, then averaged over each ``stride`` block."""
    h, w = grid
    padded = F.pad(scores[None], (0, w * stride - scores.shape[-1], 0, h * stride - scores.shape[-2]),
                   mode="replicate")
    return F.avg_pool2d(padded, stride)[0]


def from_grid(scores: torch.Tensor, stride: int, size: Sequence[int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): upsampled by ``stride`` (bilinear), then cropped to ``size``."""
    up = F.interpolate(scores[None], scale_factor=stride, mode="bilinear", align_corners=False)[0]
    return up[:, : size[0], : size[1]]


def inference_device(cfg: Any) -> torch.device:
    wants_gpu = cfg.runtime.accelerator in ("auto", "cuda", "gpu")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


# -- the refiner -----------------------------------------------------------------------------------------------------


class AffinityRefiner(Refiner):
    """Base class of the affinity refiners; see the module docstring. ``Options`` must have the fields ``backbone``,
    ``feature_stride``, ``radius``, ``label_radius``, ``beta``, ``steps``, ``margin`` and ``train`` (a
    :class:`~wsss.config.schema.ScheduleConfig`)."""

    takes = (MAPS_KIND,)
    gives = MAPS_KIND
    #: the confident regions are CRFs with the ``crf`` kernels
    sections = ("crf",)
    #: options that only shape the walk: left out of the training stage's key
    walk_options: ClassVar[tuple[str, ...]] = ("radius", "beta", "steps")

    def __init__(self, options, cfg, given=MAPS_KIND):
        super().__init__(options, cfg, given)
        if self.options.backbone == CLASSIFIER and is_transformer(cfg.model.backbone):
            raise ConfigError(f"pseudo.options.{self.name}.backbone: the classifier's backbone "
                              f"(model.backbone={cfg.model.backbone}) is a vision transformer; the affinity head reads "
                              "spatial CNN stages at several strides. Name a CNN backbone, e.g. "
                              f"pseudo.options.{self.name}.backbone=resnet50")
        self.walk_offsets: list[Offset] = half_offsets(self.options.radius)
        self.net: AffinityNet | None = None
        self.device = torch.device("cpu")
        self.background = False
        self.walked, self.seconds = 0, 0.0

    # -- what a subclass says

    def build_head(self, channels: Sequence[int]) -> nn.Module:
        """The trained head on features of ``channels``: ``head(features, grid) -> dict`` of (B, *, h, w) outputs."""
        raise NotImplementedError

    def pair_affinity(self, out: dict[str, torch.Tensor], offsets: Sequence[Offset]) -> torch.Tensor:
        """(B, K, h, w) float32 affinities in [0, 1] of the pairs ``(y, x) -> (y + dy, x + dx)`` from the network's
        output; a pair leaving the grid may have any value (it is masked)."""
        raise NotImplementedError

    def infer(self, net: AffinityNet, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network's output for one image (1, 3, H, W) at walk time (IRN adds its flip here)."""
        return net(image)

    def background_scores(self, maps: np.ndarray) -> tuple[Any, Any]:
        """(strong, weak) background scores of the confident regions of a dataset with background: numbers or
        (H, W) arrays."""
        raise NotImplementedError

    def walk(self, maps: torch.Tensor, out: dict[str, torch.Tensor], half: torch.Tensor) -> torch.Tensor:
        """(P, H, W) maps of one image -> (P, H, W) walked maps, given the network's output and the affinities
        ``half`` (Kh, h, w) of the walk's half neighbourhood. ``self.background``: the dataset has a background
        class."""
        raise NotImplementedError

    # -- shared helpers for subclasses

    def propagate(self, scores: torch.Tensor, half: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(C, h, w) grid scores -> (C, H, W): the walk (``radius``, ``beta``, ``steps``), then back to the image."""
        o = self.options
        return from_grid(random_walk(scores, half, o.radius, o.beta, o.steps), o.feature_stride, size)

    def grid_scores(self, scores: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        return to_grid(scores, self.options.feature_stride, half.shape[-2:])

    # -- confident regions (wsss.refine.relations)

    def confident_regions(self, image: np.ndarray, maps: np.ndarray, classes: np.ndarray,
                          spec: DatasetSpec) -> np.ndarray:
        from wsss.refine.relations import confident_regions

        if spec.background is not None:
            strong, weak = self.background_scores(maps) if len(classes) else (None, None)
            return confident_regions(image, maps, classes, spec, self.cfg.crf, strong, weak)
        return confident_regions(image, maps, classes, spec, self.cfg.crf, margin=self.options.margin)

    # -- the network

    def backbone_config(self) -> ModelConfig:
        if self.options.backbone == CLASSIFIER:
            # the weights come from the classifier's checkpoint
            return dataclasses.replace(self.cfg.model, pretrained=False, weights_file=None)
        return ModelConfig(backbone=self.options.backbone, output_stride=REGISTERED_OUTPUT_STRIDE, pretrained=True)

    def meta(self, spec: DatasetSpec) -> dict:
        """What a checkpoint of this refiner's network must match."""
        mc = self.backbone_config()
        return {"refiner": self.name, "backbone": mc.backbone, "output_stride": mc.output_stride,
                "feature_stride": self.options.feature_stride}

    def build_net(self, spec: DatasetSpec, classifier: Path | None = None, pretrained: bool = True) -> AffinityNet:
        """The network; its frozen backbone from the classifier checkpoint ``classifier`` (``backbone:
        classifier``), else with ImageNet weights (``pretrained``; False: weights loaded afterwards)."""
        mc = self.backbone_config()
        if not pretrained:
            mc = dataclasses.replace(mc, pretrained=False, weights_file=None)
        backbone = build_backbone(mc)
        if classifier is not None:
            from wsss.engine.checkpoint import load_classifier_backbone
            from wsss.engine.train import model_meta

            load_classifier_backbone(backbone.body, classifier, model_meta(self.cfg, spec))
        features = FrozenFeatures(backbone.body, backbone.stages, self.options.feature_stride)
        return AffinityNet(features, self.build_head(features.channels), self.options.feature_stride)

    # -- the stage (wsss.refine.base.Refiner.stages)

    def stages(self) -> list[StageDecl]:
        return [StageDecl(self.name, self._train, self._train_inputs, self.train_key, self._check_train)]

    def _train_inputs(self, cfg: Any) -> tuple[str, ...]:
        return (CLS, MAPS) if self.options.backbone == CLASSIFIER else (MAPS,)

    def train_key(self, cfg: Any) -> dict:
        """What changes the trained network besides its input stages."""
        options = {k: v for k, v in to_dict(self.options).items() if k not in self.walk_options}
        return {"refiner": self.name, "options": options, "crf": self._crf_key(),
                "engine": {k: getattr(cfg.runtime, k) for k in ("precision", "channels_last", "devices")},
                "seed": cfg.seed, "split": cfg.pseudo.split}

    def _check_train(self, ctx: Any) -> None:
        self.check(ctx)
        if self.options.backbone != CLASSIFIER:
            try:
                check_weights(self.backbone_config(), section=f"pseudo.options.{self.name}.backbone")
            except ConfigError as e:
                raise ConfigError(f"pseudo.options.{self.name}.backbone={self.options.backbone}: {e}") from None

    def _train(self, ctx: Any, inputs: dict, stage: Stage) -> dict:
        from wsss.refine.relations import train_affinity

        return train_affinity(self, ctx, inputs, stage)

    # -- the pseudo stage

    def check(self, ctx: Any) -> None:
        cfg = ctx.cfg
        check_crf_config(cfg.crf)
        split = ctx.split_name(cfg.pseudo.split)
        if cfg.pseudo.split not in cfg.maps.splits and split not in cfg.maps.splits:
            raise ConfigError(f"pseudo.refiners: '{self.name}' trains on the maps of '{split}' (pseudo.split); add it "
                              "to maps.splits")

    def prepare(self, ctx: Any, stages: Mapping[str, Stage]) -> None:
        from wsss.engine.checkpoint import load_checkpoint

        path = stages[self.name].dir / "model.pt"
        state = load_checkpoint(path, self.meta(ctx.spec))
        net = self.build_net(ctx.spec, pretrained=False)
        net.load_state_dict(state["model"])
        self.device = inference_device(self.cfg)
        self.net = net.to(self.device).eval()
        self.background = ctx.spec.background is not None
        self.walked, self.seconds = 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def refine(self, x: Item) -> Item:
        if self.net is None:
            raise RuntimeError(f"refiner '{self.name}': prepare() has not loaded its network")
        if len(x.classes) == 0:
            return x
        t0 = time.perf_counter()
        autocast = runtime_autocast(self.device, self.cfg.runtime.precision)
        with torch.no_grad():
            with autocast:
                out = self.infer(self.net, to_tensor(x.image)[None].to(self.device))
            out = {k: v.float() for k, v in out.items()}
            half = self.pair_affinity(out, self.walk_offsets)[0]
            maps = torch.from_numpy(np.ascontiguousarray(x.maps, np.float32)).to(self.device)
            walked = self.walk(maps, out, half).cpu().numpy().astype(np.float32)
        self.walked += 1
        self.seconds += time.perf_counter() - t0
        return x.replace(maps=walked)

    def info(self) -> dict:
        n = self.name
        out: dict[str, Any] = {f"{n}_walk_images": self.walked, f"{n}_walk_seconds": round(self.seconds, 2),
                               f"{n}_walk_images_per_s": round(self.walked / max(self.seconds, 1e-9), 2),
                               f"{n}_device": str(self.device)}
        if self.device.type == "cuda":
            out[f"{n}_cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out

    def _crf_key(self) -> dict:
        return {k: v for k, v in to_dict(self.cfg.crf).items() if k != "workers"}  # workers cannot change a result

    def key(self) -> dict:
        return {"options": to_dict(self.options), "crf": self._crf_key()}


__all__ = ["CLASSIFIER", "AffinityNet", "AffinityRefiner", "FrozenFeatures", "check_backbone_option", "from_grid",
           "resize", "to_grid"]
