"""Localizers: CAM, Grad-CAM and Grad-CAM++ for all positive classes of a batch in one pass.

- CAM (Zhou et al., CVPR 2016): the classifier's bias-free 1x1 head applied before pooling.
- Grad-CAM (Selvaraju et al., ICCV 2017): channel weights = spatial mean of d(score)/d(activation); map =
  ReLU(sum_c w_c A_c).
- Grad-CAM++ (Chattopadhay et al., WACV 2018): weights sum_ij alpha_ij ReLU(g_ij) with
  alpha = g^2 / (2 g^2 + sum_ij A g^3) (the closed form under the exponential-score assumption, as in the paper's
  eq. 19 and pytorch-grad-cam).

Batched gradients: pytorch-grad-cam runs one backward per class. Here the target layer's activations are computed
once, detached, and repeated P times (P = most positive classes of any image in the batch) before the rest of the
network runs; copy p of image b back-propagates only the score of its p-th class, so a single ordinary backward
through the layers *after* the target yields every (image, class) gradient. With the default target (the backbone
output) the replicated part is just the 1x1 head and pooling. BatchNorm is in eval mode at inference, so copies do
not interact.

With the default target layer and a GAP + linear head, Grad-CAM is exactly CAM / (h w) (Grad-CAM's own remark).
Where we differ from the paper: maps are multiplied by h w of the target layer, so that views at different scales are
on one scale before they are summed (unscaled, the 0.5x view outweighs the 1.5x view 9:1; on MSRC-21 that cost
9 points of train mIoU). For a single view and normalised maps this constant changes nothing.

Hooks live in a context manager and are always removed (pytorch-grad-cam leaks them when a caller forgets).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from wsss.errors import ConfigError
from wsss.registry import Registry


class Localizer(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``class_idx`` (B, P) classifier-output indices (padding slots may hold any valid index).
        Returns raw maps (B, P, h, w) and logits (B, K)."""
        ...


LOCALIZERS: Registry[type] = Registry("localizer")


@contextmanager
def replace_output(module: nn.Module, fn) -> Iterator[dict]:
    """Forward hook that swaps ``module``'s output for ``fn(output)``; removed on exit whatever happens."""
    store: dict = {}

    def hook(_m, _inp, out):
        new = fn(out)
        store["out"] = new
        return new

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def _params_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter needs a gradient here: with them frozen, autograd records nothing before the target layer and
    computes no weight gradients, so the backward covers only the layers after it."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _gather(maps: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
    b, p = class_idx.shape
    return maps.gather(1, class_idx.view(b, p, 1, 1).expand(b, p, *maps.shape[2:]))


@LOCALIZERS.register("cam")
class CAM:
    def __init__(self, target_layer: str = ""):
        if target_layer:
            raise ConfigError("maps.target_layer applies to grad_cam / grad_cam_pp only; CAM reads the classifier head")

    @torch.no_grad()
    def __call__(self, model, x, class_idx):
        out = model(x)
        return _gather(out["cams"].float(), class_idx), out["logits"].float()


class _GradientCAM:
    """Shared mechanism of the gradient-based localizers; subclasses only say how channel weights are computed."""

    def __init__(self, target_layer: str = ""):
        self.target_layer = target_layer

    def weights(self, grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _layer(self, model: nn.Module) -> nn.Module:
        if not self.target_layer:
            return model.backbone
        try:
            return model.backbone.get_submodule(self.target_layer)
        except AttributeError:
            stages = getattr(model, "stages", [])
            raise ConfigError(
                f"maps.target_layer '{self.target_layer}' is not a module of the backbone; e.g. {', '.join(stages)}"
            ) from None

    def __call__(self, model, x, class_idx):
        b, p = class_idx.shape
        saved: dict = {}

        def replicate(a: torch.Tensor) -> torch.Tensor:
            if a.dim() != 4:
                others = [n for n in LOCALIZERS.names() if not issubclass(LOCALIZERS.get(n), _GradientCAM)]
                raise ConfigError(
                    f"gradient localizers need a spatial (B, C, h, w) activation, but maps.target_layer "
                    f"'{self.target_layer}' outputs shape {tuple(a.shape)} (a transformer's tokens?); use "
                    f"maps.target_layer '' (the backbone's feature map) or one of: {', '.join(others)}")
            saved["acts"] = a.detach()
            rep = a.detach().repeat_interleave(p, dim=0)
            rep.requires_grad_(True)
            return rep

        with torch.enable_grad(), _params_frozen(model), replace_output(self._layer(model), replicate) as store:
            out = model(x)
            logits = out["logits"]  # (B*P, K)
            picked = logits.gather(1, class_idx.reshape(b * p, 1)).sum()
            (grads,) = torch.autograd.grad(picked, store["out"])
        acts = saved["acts"].float()  # (B, C, h, w)
        grads = grads.float().view(b, p, *acts.shape[1:])
        w = self.weights(grads, acts.unsqueeze(1))  # (B, P, C)
        # x (h w): with a GAP head the gradient carries 1/(h w), which would weight small scales more when views are
        # summed; scaled, Grad-CAM of the GAP head equals CAM at every scale (a per-view constant, so single-view
        # normalised maps are exactly the paper's)
        maps = torch.relu(torch.einsum("bpc,bchw->bphw", w, acts)) * (acts.shape[-2] * acts.shape[-1])
        return maps, logits.detach().float().view(b, p, -1)[:, 0]


@LOCALIZERS.register("grad_cam")
class GradCAM(_GradientCAM):
    def weights(self, grads, acts):
        return grads.mean(dim=(-2, -1))


@LOCALIZERS.register("grad_cam_pp")
class GradCAMPlusPlus(_GradientCAM):
    def weights(self, grads, acts):
        g2 = grads.pow(2)
        g3 = g2 * grads
        sum_a = acts.sum(dim=(-2, -1), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-7)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * torch.relu(grads)).sum(dim=(-2, -1))


def build_localizer(name: str, target_layer: str = "") -> Localizer:
    return LOCALIZERS.get(name)(target_layer)
