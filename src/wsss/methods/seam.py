"""SEAM: self-supervised equivariant attention (Wang, Zhang, Kan, Shan & Chen, "Self-supervised Equivariant
Attention Mechanism for Weakly Supervised Semantic Segmentation", CVPR 2020; official code github.com/YudeWang/SEAM,
``train_SEAM.py`` and ``network/resnet38_SEAM.py``).

A siamese classifier sees the image and an affine-transformed copy A(x) (here: rescaled by ``scale``, optionally
mirrored). Segmentation maps should be equivariant, CAM(A(x)) = A(CAM(x)), which a classifier's CAMs are not.
Three additions make them so:

- Equivariant regularisation (ER): L1 between the CAM of A(x) and A(CAM of x).
- Pixel correlation module (PCM): each pixel's map becomes the affinity-weighted average of all pixels' maps,
  ``y'_j = sum_i relu(cos(f_i, f_j)) y_i / sum_i relu(cos(f_i, f_j))``, with f a learned 1x1 projection of
  backbone features and the downsampled image.
- Equivariant cross regularisation (ECR): L1 between the raw CAM of one branch and the (transformed) PCM maps of
  the other, in both directions.

The total loss is the mean of the two branches' multi-label soft-margin losses + ``er_weight`` ER + ``ecr_weight``
ECR (+ ``min_pool_weight`` times the official code's min-pooling loss). The final localization maps are the PCM
maps of a single branch: in eval mode the model returns them as ``"cams"`` (the shared loop calls ``model(x)`` once
per batch, so in training mode the model runs both branches itself and returns what the loss needs).

As in the official code (we follow it wherever the paper leaves a detail open):

- the transformation is a 0.3x downscale (``scale_factor = 0.3`` in ``train_SEAM.py``);
- the PCM input is the detached CAM, ReLU'd and divided by its maximum, with every foreground class but the
  pixel's top one set to 0, and the PCM sees *detached* backbone features: the PCM's gradients only train its own
  projections, ER and the classification loss train the backbone and head;
- before ER/ECR, maps are ReLU'd and min-max normalised per class and multiplied by the image labels; the ECR
  target (the other branch's raw CAM) is detached, keeps only each pixel's top foreground class, and only the
  largest ``ecr_topk`` (20 %) of the absolute differences of an image count (online hard example mining);
- a background channel ``1 - max_c fg_c`` joins the ECR maps (VOC has a background class).

Where we differ, and why:

- Features for the PCM. The official ResNet-38 uses its ``conv4`` (512 ch) and ``conv5`` (1024 ch) outputs, both
  at stride 8, projected to 64 and 128 channels, plus the image. Our backbones expose named ``stages``
  (wsss.models.backbones); by default we take the last stage at stride 8 and the last stage at stride 16 that is
  not the backbone's final module (ResNet: layer2 + layer3, the closest match to conv4/conv5; MobileNetV2 at OS16:
  blocks 6 (32 ch) and 17 (320 ch); at OS32: 6 and 13), found by one probe forward at build time.
  ``pcm_stages`` names others. Everything is pooled (area) to the CAM's resolution, which for OS16/32 backbones is
  coarser than the official stride 8.
- Datasets without a background class (MSRC-21, every pixel is a class): ``background`` defaults to the dataset
  (true where the dataset spec has a background class, the paper's VOC setting; false otherwise; true when the
  method is built without a dataset). Without background the background channel is dropped from ECR, and the
  min-pooling loss, whose premise is that the lowest-scoring quarter of an image is background, is refused.
  Eval-mode maps are foreground only either way (the PCM works per channel, so a background channel in its input
  changes no foreground output).
- The min-pooling loss (``adaptive_min_pooling_loss`` in ``train_SEAM.py``) is off by default: the official code's
  own comment says it does not change the best score, only the optimal background threshold.
- No Dropout2d before the head (the official ResNet-38 has one): our CAM baseline has none, and SEAM is compared to
  it.
- ER compares maps at the transformed image's size like the official code, but resizes the raw maps there first and
  normalises afterwards; the transformed image is resized with antialiasing.

Cost (1 CPU thread, batch 4 at 320 x 320, MobileNetV2 OS16, fp32, CPU time): a CAM step 0.66 s, a SEAM step
0.93 s: the 0.3x branch 0.07 s, the PCM about 0.01 s per branch, ER + ECR 0.10 s (at the transformed image's 96 x 96,
as the official code).
- ``pcm=false`` drops the PCM (CAM + ER only, an ablation): maps are then the raw CAM. With the PCM on and both
  ``ecr_weight`` and ``min_pool_weight`` 0 its projections would never train, so that combination is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method
from wsss.models import CAMClassifier, build_backbone
from wsss.models.backbones import Backbone

#: width of the projection of the shallowest side feature, doubling with depth (official: 64 for conv4, 128 for conv5)
SIDE_DIM = 64
#: width of the PCM's embedding (official ``f9``: 192)
EMBED_DIM = 192


@dataclass
class SEAMOptions:
    #: rescale factor of the transformed branch (official code: 0.3, a downscale, which also makes it cheap)
    scale: float = 0.3
    #: also mirror the transformed branch horizontally (the official code only rescales)
    flip: bool = False
    #: weight of equivariant regularisation (0 = off)
    er_weight: float = 1.0
    #: weight of equivariant cross regularisation (0 = off)
    ecr_weight: float = 1.0
    #: share of each image's (class, pixel) ECR terms that count, the largest first (official: 0.2; 1 = plain L1)
    ecr_topk: float = 0.2
    #: weight of the official code's min-pooling loss on the PCM maps (official: 1; needs background=true)
    min_pool_weight: float = 0.0
    #: add a background channel (1 - max fg) to the ECR maps; null = whether the run's dataset has a background class
    background: bool | None = None
    #: refine maps with the pixel correlation module; false = CAM + ER only, maps are the raw CAM
    pcm: bool = True
    #: backbone stages whose outputs feed the PCM (names from the backbone's stages); empty = last at stride 8 and
    #: last non-final at stride 16
    pcm_stages: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"method.options.scale: must be > 0, got {self.scale}")
        if self.scale == 1.0 and not self.flip:
            raise ConfigError("method.options.scale=1 without flip makes the transformed branch a copy of the image; "
                              "use a scale != 1 (official: 0.3) and/or flip=true")
        for key in ("er_weight", "ecr_weight", "min_pool_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.options.{key}: must be >= 0 (0 turns the loss off), got {getattr(self, key)}")
        if not 0.0 < self.ecr_topk <= 1.0:
            raise ConfigError(f"method.options.ecr_topk: must be in (0, 1], got {self.ecr_topk}")
        if self.min_pool_weight > 0 and self.background is False:
            raise ConfigError("method.options.min_pool_weight: the min-pooling loss treats each image's lowest-scoring "
                              "quarter as background; a dataset without background (background=false) needs 0")
        if not self.pcm:
            used = [k for k in ("ecr_weight", "min_pool_weight") if getattr(self, k) > 0]
            if used or self.pcm_stages:
                raise ConfigError(f"method.options.pcm=false: {', '.join(used or ['pcm_stages'])} need(s) the PCM; "
                                  "set ecr_weight=0 and min_pool_weight=0 and leave pcm_stages empty")
        elif self.ecr_weight == 0 and self.min_pool_weight == 0:
            raise ConfigError("method.options: with ecr_weight=0 and min_pool_weight=0 the PCM's projections never "
                              "train, yet its maps would be the output; set pcm=false for maps from the raw CAM")


# ---------------------------------------------------------------------------------------------------- transforms


def transformed_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """(h, w) of the transformed branch for an input of ``size``: floor(size * scale), at least 1."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def transform_images(x: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """A(x) for images: antialiased bilinear resize to ``size``, then mirror if ``flip``."""
    # antialiased resampling has no bfloat16 kernel on CPU (runtime.precision=bf16 hands bf16 inputs here): resize in
    # fp32 and return the input's dtype
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                        antialias=x.shape[-1] > size[1]).to(x.dtype)
    return out.flip(-1) if flip else out


def transform_maps(maps: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """A(maps): bilinear resize to ``size``, then mirror if ``flip`` (the same geometric map as for images)."""
    if maps.shape[-2:] != torch.Size(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.flip(-1) if flip else maps


# ---------------------------------------------------------------------------------------------------- maps


def minmax_normalise(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Official ``max_norm``: ReLU, then (m - min - eps)+ / (max - min + eps) per (image, class)."""
    maps = torch.relu(maps)
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    return torch.relu(maps - lo - eps) / (hi - lo + eps)


def with_background(fg: torch.Tensor) -> torch.Tensor:
    """(B, 1 + K, h, w): a background channel 1 - max_c fg_c in front of the K foreground maps (values in [0, 1])."""
    return torch.cat([1 - fg.amax(dim=1, keepdim=True), fg], dim=1)


def keep_top_class(maps: torch.Tensor, background: bool) -> torch.Tensor:
    """Foreground entries below the pixel's largest foreground score set to 0 (ties kept); a leading background
    channel (``background``) is left as it is (official ``max_onehot``)."""
    fg = maps[:, 1:] if background else maps
    fg = torch.where(fg >= fg.amax(dim=1, keepdim=True), fg, torch.zeros_like(fg))
    return torch.cat([maps[:, :1], fg], dim=1) if background else fg


def pcm_seeds(cams: torch.Tensor, background: bool, eps: float = 1e-5) -> torch.Tensor:
    """The PCM's input: CAMs ReLU'd and divided by their maximum, only each pixel's top foreground class kept, and a
    background channel 1 - max fg in front if ``background``."""
    m = torch.relu(cams)
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(eps)
    return keep_top_class(with_background(m) if background else m, background)


def pixel_correlation(maps: torch.Tensor, embedding: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PCM: ``out_j = sum_i a_ij maps_i / sum_i a_ij`` with ``a_ij = relu(cos(e_i, e_j))``, for (B, C, h, w) maps
    and a (B, D, h, w) embedding at the same resolution. Computed in float32 (the affinity is a large sum)."""
    b, c, h, w = maps.shape
    with torch.autocast(maps.device.type, enabled=False):
        e = F.normalize(embedding.float().flatten(2), dim=1, eps=eps)  # (B, D, N)
        aff = torch.relu(e.transpose(1, 2) @ e)  # (B, N, N), symmetric
        aff = aff / aff.sum(dim=1, keepdim=True).clamp_min(eps)  # column j: weights over source pixels i
        return (maps.float().flatten(2) @ aff).view(b, c, h, w)


# ---------------------------------------------------------------------------------------------------- losses


def equivariance_loss(maps: torch.Tensor, maps_t: torch.Tensor, labels: torch.Tensor, size: tuple[int, int],
                      flip: bool) -> torch.Tensor:
    """ER: mean |norm(A(maps)) - norm(maps_t)| at the transformed image ``size``, absent classes zeroed.

    ``maps``: raw CAMs of the image (B, K, h, w); ``maps_t``: raw CAMs of A(image); ``labels``: (B, K) multi-hot."""
    mask = labels[:, :, None, None]
    a = minmax_normalise(transform_maps(maps.float(), size, flip)) * mask
    b = minmax_normalise(transform_maps(maps_t.float(), size, False)) * mask
    return (a - b).abs().mean()


def hard_l1(pred: torch.Tensor, target: torch.Tensor, topk: float) -> torch.Tensor:
    """Mean of the largest ``topk`` share of |pred - target| of each image (all of them for topk=1)."""
    diff = (pred - target).abs().flatten(1)
    k = max(1, int(diff.shape[1] * topk))
    return diff.topk(k, dim=1).values.mean() if k < diff.shape[1] else diff.mean()


def cross_equivariance_loss(cams: torch.Tensor, cams_t: torch.Tensor, pcm: torch.Tensor, pcm_t: torch.Tensor,
                            labels: torch.Tensor, size: tuple[int, int], flip: bool, background: bool,
                            topk: float) -> torch.Tensor:
    """ECR: |A(PCM maps of x) - CAM of A(x)| + |PCM maps of A(x) - A(CAM of x)|, each over the top ``topk`` share.

    ``cams``/``cams_t``: raw CAMs (B, K, ...) of x and A(x); ``pcm``/``pcm_t``: PCM outputs (B, K or 1 + K, ...)
    with a leading background channel when ``background``. The CAM side is the (detached) target."""
    mask = labels[:, :, None, None]
    raw = minmax_normalise(transform_maps(cams.float(), size, flip)) * mask
    raw_t = minmax_normalise(transform_maps(cams_t.float(), size, False)) * mask
    ref = minmax_normalise(transform_maps(pcm.float(), size, flip))
    ref_t = minmax_normalise(transform_maps(pcm_t.float(), size, False))
    if background:
        raw, raw_t = with_background(raw), with_background(raw_t)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    target, target_t = keep_top_class(raw.detach(), background), keep_top_class(raw_t.detach(), background)
    return hard_l1(ref * mask, target_t, topk) + hard_l1(ref_t * mask, target, topk)


def min_pool_loss(pcm_fg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Official ``adaptive_min_pooling_loss``: the lowest quarter of pixels of max_c (PCM maps of present classes)
    pushed to 0."""
    top = (pcm_fg.float() * labels[:, :, None, None]).amax(dim=1).flatten(1)
    k = max(1, top.shape[1] // 4)
    return torch.relu(top.topk(k, dim=1, largest=False).values).mean()


# ---------------------------------------------------------------------------------------------------- model


@contextmanager
def capture_outputs(root: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Outputs of ``root``'s submodules ``names`` during the block; the hooks are removed on exit."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(root.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: store.__setitem__(name, out)))
        yield store
    finally:
        for h in handles:
            h.remove()


def probe_stages(body: nn.Module, stages: Sequence[str], size: int = 64) -> dict[str, tuple[int, int]]:
    """(channels, stride) of each stage's output, from one forward of a ``size`` x ``size`` zero image."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad(), capture_outputs(body, stages) as out:
            body(torch.zeros(1, 3, size, size, device=next(body.parameters()).device))
    finally:
        body.train(was_training)
    return {n: (int(t.shape[1]), round(size / t.shape[-1])) for n, t in out.items()}


def default_side_stages(info: dict[str, tuple[int, int]], stages: Sequence[str]) -> list[str]:
    """The last stage at stride 8 and the last stage at stride 16 that is not the final one (see module doc)."""
    chosen = []
    for stride in (8, 16):
        at = [n for n in stages[:-1] if info[n][1] == stride]
        if not at:
            raise ConfigError(f"SEAM: the backbone has no stage at stride {stride} before its last "
                              f"(strides: {', '.join(f'{n}:{info[n][1]}' for n in stages)}); "
                              "name the PCM's features with method.options.pcm_stages")
        chosen.append(at[-1])
    return chosen


def _fit(t: torch.Tensor, batch: int, size: torch.Size) -> torch.Tensor:
    """``t`` pooled (area) or upsampled to ``size``; repeated along the batch where a Grad-CAM pass has replicated
    the backbone output (wsss.localize.localizers: copies of an image are consecutive)."""
    if t.shape[-2:] != size:
        if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
            t = F.adaptive_avg_pool2d(t, size)
        else:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    if t.shape[0] != batch:
        t = t.repeat_interleave(batch // t.shape[0], dim=0)
    return t


class SEAMClassifier(CAMClassifier):
    """CAM classifier + pixel correlation module, running both siamese branches in training mode.

    Training mode returns ``logits``/``logits_t`` (B, K), raw CAMs ``raw_cams``/``raw_cams_t`` and PCM maps
    ``pcm``/``pcm_t`` (with a leading background channel when ``background``) of x and A(x), and ``cams`` (the PCM
    foreground maps of x). Eval mode runs x only: ``logits`` and ``cams`` = PCM maps (raw CAMs with ``pcm=False``).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, scale: float, flip: bool, background: bool,
                 pcm: bool = True, pcm_stages: Sequence[str] = (), freeze_bn: bool = True):
        super().__init__(backbone, num_classes, freeze_bn)
        self.scale, self.flip, self.background, self.use_pcm = scale, flip, background, pcm
        self.side_stages: list[str] = []
        if not pcm:
            return
        info = probe_stages(self.backbone, self.stages)
        unknown = [n for n in pcm_stages if n not in info]
        if unknown:
            raise ConfigError(f"method.options.pcm_stages: {unknown} are not stages of backbone; its stages: "
                              f"{', '.join(self.stages)}")
        self.side_stages = list(pcm_stages) or default_side_stages(info, self.stages)
        n = len(self.side_stages)
        dims = [SIDE_DIM * 2 ** i for i in range(n)]
        self.side_proj = nn.ModuleList(nn.Conv2d(info[s][0], d, 1, bias=False) for s, d in zip(self.side_stages, dims))
        self.embed = nn.Conv2d(3 + sum(dims), EMBED_DIM, 1, bias=False)
        for conv in self.side_proj:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)  # as the official f9

    def embedding(self, x: torch.Tensor, side: Sequence[torch.Tensor], batch: int, size: torch.Size) -> torch.Tensor:
        """The PCM's per-pixel embedding from the (detached) side features and the image, at the CAM resolution."""
        feats = [torch.relu(proj(_fit(s.detach(), batch, size))) for proj, s in zip(self.side_proj, side)]
        return self.embed(torch.cat([_fit(x, batch, size), *feats], dim=1))

    def refine(self, cams: torch.Tensor, side: Sequence[torch.Tensor], x: torch.Tensor, background: bool) -> torch.Tensor:
        """PCM maps of ``cams`` (B, K, h, w) -> (B, K or 1 + K, h, w); gradients reach only the PCM projections."""
        with torch.no_grad():
            seeds = pcm_seeds(cams.detach().float(), background)
        return pixel_correlation(seeds, self.embedding(x, side, cams.shape[0], cams.shape[-2:]))

    def branch(self, x: torch.Tensor, background: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw CAMs and PCM maps (None without the PCM) of one branch."""
        with capture_outputs(self.backbone, self.side_stages) as side:
            feats = self.features(x)
        cams = self.cam(feats)
        if not self.use_pcm:
            return cams, None
        return cams, self.refine(cams, [side[n] for n in self.side_stages], x, background)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            cams, pcm = self.branch(x, background=False)
            return {"logits": cams.mean(dim=(2, 3)), "cams": cams if pcm is None else pcm}
        cams, pcm = self.branch(x, self.background)
        x_t = transform_images(x, transformed_size(x.shape[-2:], self.scale), self.flip)
        cams_t, pcm_t = self.branch(x_t, self.background)
        out = {"logits": cams.mean(dim=(2, 3)), "logits_t": cams_t.mean(dim=(2, 3)),
               "raw_cams": cams, "raw_cams_t": cams_t}
        if pcm is None:
            out["cams"] = cams
        else:
            out.update(pcm=pcm, pcm_t=pcm_t, cams=pcm[:, 1:] if self.background else pcm)
        return out


# ---------------------------------------------------------------------------------------------------- method


@METHODS.register("seam")
class SEAM(Method):
    name = "seam"
    Options = SEAMOptions

    def __init__(self, options: dict | None = None, *, has_background: bool | None = None):
        super().__init__(options, has_background=has_background)
        if self.options.background is None:  # from the dataset; re-validated (min-pooling needs background)
            resolved = True if self.has_background is None else self.has_background
            try:
                self.options = dataclasses.replace(self.options, background=resolved)
            except ConfigError as e:
                raise ConfigError(f"{e} (this dataset has {'a' if resolved else 'no'} background class)") from None

    def build_model(self, model_cfg: ModelConfig, num_classes: int) -> nn.Module:
        o = self.options
        return SEAMClassifier(build_backbone(model_cfg), num_classes, scale=o.scale, flip=o.flip,
                              background=o.background, pcm=o.pcm, pcm_stages=o.pcm_stages,
                              freeze_bn=model_cfg.freeze_bn)

    def loss(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        labels = batch["labels"].float()
        cls = (F.multilabel_soft_margin_loss(out["logits"].float(), labels)
               + F.multilabel_soft_margin_loss(out["logits_t"].float(), labels)) / 2
        total, parts = cls, {"cls": float(cls.detach())}
        size = transformed_size(batch["image"].shape[-2:], o.scale)
        if o.er_weight > 0:
            er = equivariance_loss(out["raw_cams"], out["raw_cams_t"], labels, size, o.flip)
            total = total + o.er_weight * er
            parts["er"] = float(er.detach())
        if o.ecr_weight > 0:
            ecr = cross_equivariance_loss(out["raw_cams"], out["raw_cams_t"], out["pcm"], out["pcm_t"], labels, size,
                                          o.flip, o.background, o.ecr_topk)
            total = total + o.ecr_weight * ecr
            parts["ecr"] = float(ecr.detach())
        if o.min_pool_weight > 0:
            fg, fg_t = out["pcm"][:, 1:], out["pcm_t"][:, 1:]  # min-pooling requires background (options check)
            mp = (min_pool_loss(fg, labels) + min_pool_loss(fg_t, labels)) / 2
            total = total + o.min_pool_weight * mp
            parts["min_pool"] = float(mp.detach())
        return total, parts
