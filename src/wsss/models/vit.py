"""Vision-transformer backbones (timm ViT / DeiT) whose patch tokens form a (B, C, h, w) feature map.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (ViT); Touvron et al., "Training data-efficient image
transformers", ICML 2021 (DeiT). Architectures and weights come from timm (``timm.create_model``); this module only
turns the model into a wsss :class:`~wsss.models.backbones.Backbone`, as TS-CAM (Gao et al., ICCV 2021) does: the
final-normed patch tokens are reshaped to their grid, so the CAM head, CAM / Grad-CAM localizers, multi-scale
inference and the DeepLab head work on a ViT unchanged. The class token is kept inside the model (the attention
localizers in :mod:`wsss.localize.attention` read its attention) but the classifier does not use it.

Registered backbones (``model.backbone``) and the timm models behind them:

=============  ===========================  ======================================
name           timm model                   default pretrained tag (input norm)
=============  ===========================  ======================================
``vit_tiny``   ``vit_tiny_patch16_224``     augreg_in21k_ft_in1k (mean = std = 0.5)
``vit_small``  ``vit_small_patch16_224``    augreg_in21k_ft_in1k (mean = std = 0.5)
``vit_base``   ``vit_base_patch16_224``     augreg2_in21k_ft_in1k (mean = std = 0.5)
``deit_tiny``  ``deit_tiny_patch16_224``    fb_in1k (ImageNet mean / std)
``deit_small`` ``deit_small_patch16_224``   fb_in1k (ImageNet mean / std; TS-CAM's backbone)
``vit_test``   (built here)                 none: patch 8, dim 64, depth 2, 2 heads, for tests
=============  ===========================  ======================================

Where we differ from timm's defaults, and why:

- Input sizes. Positional embeddings are resampled to every input's patch grid (timm's ``dynamic_img_size``), so
  training crops, whole images and multi-scale views of any size work. An input whose side is not a multiple of the
  patch size is *resized* (bilinear, by less than half a patch) to the nearest multiple rather than padded: a padded
  image's map would cover the padding too and be stretched onto the image by the upsampling in
  :func:`wsss.localize.multiscale_maps`, shifting its far edge by up to a patch; resized, the map's grid covers exactly
  the image.
- Input normalisation. wsss feeds ImageNet-normalised images; the AugReg ViTs expect mean = std = 0.5. The body
  converts (one per-channel affine map) to the normalisation of the model's pretrained config.
- ``model.output_stride``: a ViT's stride is its patch size (16; 8 for ``vit_test``), which nothing can change
  without retraining. 16 (the default) is accepted for every ViT; 32 is refused with a clear error rather than
  silently ignored.
- Grad-CAM targets: the blocks output token sequences, not spatial maps, so ``Backbone.stages`` is empty and
  Grad-CAM runs only on the backbone's output map (``maps.target_layer: ""``).

Pretrained weights (``model.pretrained: true``, the default) go through timm's own path: ``timm.create_model(name,
pretrained=True)`` looks in the Hugging Face hub cache (``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) and
downloads the weights into it when missing. Offline, either copy that cache folder from a machine with network (and
set ``HF_HUB_OFFLINE=1`` so the hub is not asked at all), or give ``model.weights_file`` a local checkpoint of the same
architecture (``.pth`` / ``.bin`` / ``.safetensors``, timm or original DeiT key names; positional embeddings of
another grid size are resampled). With neither, building the backbone fails with a :class:`~wsss.errors.ConfigError`
that says so (after huggingface_hub's own retries, about a minute, unless ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from wsss.errors import CheckpointError, ConfigError
from wsss.models.backbones import BACKBONES, Backbone

log = logging.getLogger("wsss.models")

#: wsss name -> timm model name
TIMM_VITS: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
}

#: keys of a classification checkpoint that a backbone without a classifier does not have
_HEAD_KEYS = ("head.", "head_dist.", "fc_norm.")


class ViTFeatures(nn.Module):
    """A timm VisionTransformer as a feature extractor: (B, 3, H, W) ImageNet-normalised images -> (B, C, h, w) map
    of its final-normed patch tokens, h = round(H / patch), w = round(W / patch)."""

    def __init__(self, vit: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.vit = vit
        self.patch = tuple(vit.patch_embed.patch_size)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        # x_model = (x * std_in + mean_in - mean) / std; non-persistent: checkpoints hold only the network's weights
        src_m, src_s = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("in_scale", (src_s / s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((src_m - m) / s).view(1, 3, 1, 1), persistent=False)

    @property
    def out_channels(self) -> int:
        return int(self.vit.embed_dim)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) of an input of spatial ``size`` (H, W)."""
        return tuple(max(1, round(n / p)) for n, p in zip(size, self.patch))

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every block, first to last (read by wsss.localize.attention)."""
        return [blk.attn for blk in self.vit.blocks]

    def has_class_token(self) -> bool:
        return getattr(self.vit, "cls_token", None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        h, w = self.grid(tuple(x.shape[-2:]))
        size = (h * self.patch[0], w * self.patch[1])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tokens = self.vit.forward_features(x)[:, self.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _check_stride(name: str, cfg: ModelConfig, patch: int) -> None:
    if cfg.output_stride != 16:
        raise ConfigError(
            f"model.output_stride={cfg.output_stride} does not apply to the transformer backbone '{name}': its feature "
            f"stride is its patch size ({patch}); leave model.output_stride at 16")


def load_vit_weights(vit: nn.Module, path: str) -> None:
    """Load a local ViT checkpoint (timm or original DeiT/JAX-converted key names, optionally wrapped in "model" or
    "state_dict") into ``vit``; its classifier head is dropped, other missing or extra keys are an error."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights_file {p} does not exist")
    try:
        state = load_state_dict(str(p), use_ema=False)
    except Exception as e:  # torch.load / safetensors raise several types for a file that is not a checkpoint
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    what = f"this ViT ({type(vit).__name__}, dim {vit.embed_dim}, depth {len(vit.blocks)})"
    try:
        state = checkpoint_filter_fn(state, vit)  # key renames, positional embeddings resampled to this grid
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_KEYS)}
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensor shapes of another architecture
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{p}: does not fit {what}: {'; '.join(lines[1:3]) or lines[0]}") from e
    missing = [k for k in missing if not k.startswith(_HEAD_KEYS)]
    if missing or unexpected:
        raise CheckpointError(f"{p}: does not fit {what}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")


def _timm_vit(name: str, arch: str) -> Callable[[ModelConfig], Backbone]:
    def build(cfg: ModelConfig) -> Backbone:
        import timm

        _check_stride(name, cfg, 16)
        pretrained = cfg.pretrained and not cfg.weights_file
        if pretrained:
            log.info("model: timm pretrained weights for %s (Hugging Face hub cache, downloaded when missing)", arch)
        try:
            vit = timm.create_model(arch, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
        except Exception as e:  # hub unreachable or cache miss: huggingface_hub / httpx raise OSError and others
            if not pretrained:
                raise
            raise ConfigError(
                f"model.pretrained: could not get timm's pretrained weights for '{name}' ({arch}): "
                f"{type(e).__name__}: {str(e).splitlines()[0].rstrip('.') if str(e) else ''}. Offline, set model.weights_file to "
                "a local checkpoint of this architecture, or copy a Hugging Face hub cache that holds it "
                "(see wsss.models.vit), or set model.pretrained=false") from e
        if cfg.weights_file:
            load_vit_weights(vit, cfg.weights_file)
        pcfg = getattr(vit, "pretrained_cfg", None) or {}
        body = ViTFeatures(vit, pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD))
        return Backbone(body=body, out_channels=body.out_channels, stages=[])

    return build


def _transformer(build, timm_arch: str | None):
    """Marks a builder as a vision transformer's (see :func:`wsss.models.backbones.is_transformer`); ``timm_arch``:
    the timm architecture whose pretrained weights it loads (None: none exist)."""
    build.transformer = True
    build.timm_arch = timm_arch
    return build


for _name, _arch in TIMM_VITS.items():
    BACKBONES.register(_name)(_transformer(_timm_vit(_name, _arch), _arch))


def vit_test(cfg: ModelConfig) -> Backbone:
    """A config-sized ViT for tests (patch 8, dim 64, depth 2, 2 heads); no pretrained weights exist for it."""
    from timm.models.vision_transformer import VisionTransformer

    _check_stride("vit_test", cfg, 8)
    if cfg.pretrained and not cfg.weights_file:
        raise ConfigError("model.pretrained: backbone 'vit_test' is a test-sized ViT without pretrained weights; "
                          "set model.pretrained=false or model.weights_file")
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=0, dynamic_img_size=True)
    if cfg.weights_file:
        load_vit_weights(vit, cfg.weights_file)
    body = ViTFeatures(vit)
    return Backbone(body=body, out_channels=body.out_channels, stages=[])


BACKBONES.register("vit_test")(_transformer(vit_test, None))

__all__ = ["TIMM_VITS", "ViTFeatures", "load_vit_weights"]
