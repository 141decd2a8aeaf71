"""Attention localizers for vision-transformer backbones: the class token's attention, and attention rollout.

- ``attention``: the class token's attention to the patch tokens in the last block, mean over heads (the
  semantic-agnostic map of TS-CAM, Gao et al., "TS-CAM: Token Semantic Coupled Attention Map for Weakly Supervised
  Object Localization", ICCV 2021).
- ``rollout``: attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020): per block
  the head-averaged attention A plus the residual connection, A' = 0.5 A + 0.5 I with rows renormalised, multiplied
  over the blocks, R = A'_L ... A'_1; the map is the class token's row of R over the patch tokens.

Both maps say where the network looks, not for which class. A localizer must give one map per positive class
(the :class:`~wsss.localize.localizers.Localizer` protocol: (B, P, h, w) maps and (B, K) logits), so the coupling is
an explicit choice, ``coupling``:

- ``"cam"`` (default, TS-CAM's token-semantic coupling): map_k = attention * CAM_k, CAM_k being the model's patch-token
  class activation map of class k (``out["cams"]``, the method's final maps). The attention says *where the object
  is*, the CAM *which class it is*.
- ``"none"``: the class-agnostic map repeated for every class (for inspection; pseudo masks need ``"cam"``).

Where we differ from the papers, and why:

- TS-CAM sums the class-token attention over all blocks; ``attention`` here reads only the last block (as asked of
  this localizer; rollout is the all-blocks variant).
- The attention row is taken over the patch tokens only and divided by its mean, so a uniform attention is 1
  everywhere: map_k then equals CAM_k, and views of different sizes (whose raw attention per patch scales as
  1 / number of patches) add up on CAM's scale in multi-scale inference, as CAM's own views do.
- The products run in float32 with autocast off: a 12-block rollout in bf16 loses the small entries.

Attention probabilities are captured with forward hooks on each attention module's ``attn_drop`` (the identity in
eval mode, applied to the softmaxed attention). timm's fused attention (``scaled_dot_product_attention``) never forms
them, so the captured modules run unfused for this pass; hooks and the fused flag are restored on exit, whatever
happens (:func:`capture_attention`). Rollout accumulates R block by block in the hook, so memory is one (B, N, N)
matrix, not one per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from wsss.errors import ConfigError
from wsss.localize.localizers import LOCALIZERS, _gather

Coupling = Literal["cam", "none"]


def rollout_step(rollout: torch.Tensor | None, attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """One block of attention rollout: ``attn`` (B, N, N) head-averaged attention (or (B, H, N, N), averaged here);
    returns A' @ rollout with A' = (1 - residual) A + residual I, rows renormalised (A' alone for the first block)."""
    if attn.dim() == 4:
        attn = attn.mean(dim=1)
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    a = (1.0 - residual) * attn + residual * eye
    a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else a @ rollout


def attention_rollout(attentions: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout R = A'_L ... A'_1 of per-block attentions (first block first), each (B, N, N) or
    (B, H, N, N). Returns (B, N, N); row 0 is the class token's flow to every token."""
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one block")
    r = None
    for a in attentions:
        r = rollout_step(r, a, residual)
    return r


def class_token_map(attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], eps: float = 1e-12) -> torch.Tensor:
    """Class token's row of a (B, N, N) attention or rollout matrix, over the patch tokens, as a (B, 1, h, w) map
    divided by its mean (uniform attention -> 1 everywhere; an all-zero row stays zero)."""
    row = attn[:, 0, num_prefix_tokens:]
    if row.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{row.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid")
    row = row / row.mean(dim=1, keepdim=True).clamp_min(eps)
    return row.reshape(-1, 1, *grid)


@contextmanager
def capture_attention(modules: Sequence[nn.Module], on_probs: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Calls ``on_probs(i, probs)`` with the softmaxed (B, H, N, N) attention of ``modules[i]`` (timm Attention) on
    every forward inside the block. Fused attention is switched off for these modules and restored on exit; the
    hooks are always removed."""
    for m in modules:
        if not (hasattr(m, "attn_drop") and hasattr(m, "fused_attn")):
            raise ConfigError(f"attention localizers read timm Attention modules (with attn_drop and fused_attn); "
                              f"{type(m).__name__} has no such attention probabilities to read")
    fused = [m.fused_attn for m in modules]
    handles = []
    try:
        for i, m in enumerate(modules):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(lambda _mod, _inp, out, i=i: on_probs(i, out)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(modules, fused):
            m.fused_attn = f


class _ClassTokenAttention:
    """Shared mechanism: one forward pass with the attention captured; subclasses say which blocks they read and how
    the captured attentions become one (B, N, N) matrix."""

    #: localizers that need a transformer's attention (the others apply to any backbone with a spatial map)
    needs_attention = True
    name = ""

    def __init__(self, target_layer: str = "", coupling: Coupling = "cam"):
        if target_layer:
            raise ConfigError(f"maps.target_layer applies to grad_cam / grad_cam_pp only; '{self.name}' reads the "
                              "transformer's attention")
        if coupling not in ("cam", "none"):
            raise ConfigError(f"attention coupling '{coupling}' is not one of: cam, none")
        self.coupling = coupling

    def blocks(self, modules: list[nn.Module]) -> list[nn.Module]:
        raise NotImplementedError

    def reduce(self, state: dict, i: int, probs: torch.Tensor) -> None:
        raise NotImplementedError

    def _body(self, model: nn.Module):
        body = getattr(model, "backbone", None)
        if not hasattr(body, "attention_modules"):
            others = [n for n in LOCALIZERS.names() if not getattr(LOCALIZERS.get(n), "needs_attention", False)]
            raise ConfigError(
                f"maps.localizer '{self.name}' reads a vision transformer's attention, but the model's backbone "
                f"({type(body).__name__}) has none (a CNN); localizers that apply to it: {', '.join(others)}. "
                "Transformer backbones: vit_tiny, vit_small, vit_base, deit_tiny, deit_small")
        if not body.has_class_token():
            raise ConfigError(f"maps.localizer '{self.name}' reads the class token's attention; this ViT has no class "
                              "token (use cam or grad_cam)")
        return body

    def __call__(self, model, x, class_idx):
        body = self._body(model)
        modules = self.blocks(body.attention_modules())
        state: dict = {}

        def on_probs(i: int, probs: torch.Tensor) -> None:
            with torch.autocast(probs.device.type, enabled=False):
                self.reduce(state, i, probs.detach().float())

        with torch.no_grad(), capture_attention(modules, on_probs):
            out = model(x)
        if "attn" not in state:
            raise RuntimeError(f"'{self.name}': the model's forward did not run its attention blocks")
        agnostic = class_token_map(state["attn"], body.num_prefix_tokens, body.grid(tuple(x.shape[-2:])))
        cams = _gather(out["cams"].float(), class_idx)
        if agnostic.shape[-2:] != cams.shape[-2:]:
            # a method whose final maps are not on the patch grid: bring the attention to their grid
            agnostic = nn.functional.interpolate(agnostic, size=cams.shape[-2:], mode="bilinear", align_corners=False)
        maps = agnostic * cams if self.coupling == "cam" else agnostic.expand_as(cams)
        return maps, out["logits"].float()


@LOCALIZERS.register("attention")
class ClassTokenAttention(_ClassTokenAttention):
    """Class token -> patch attention of the last block, mean over heads."""

    name = "attention"

    def blocks(self, modules):
        return modules[-1:]

    def reduce(self, state, i, probs):
        state["attn"] = probs.mean(dim=1)


@LOCALIZERS.register("rollout")
class AttentionRollout(_ClassTokenAttention):
    """Attention rollout over all blocks (residual 0.5, as in Abnar & Zuidema)."""

    name = "rollout"
    residual = 0.5

    def blocks(self, modules):
        return modules

    def reduce(self, state, i, probs):
        state["attn"] = rollout_step(state.get("attn"), probs, self.residual)


__all__ = ["AttentionRollout", "ClassTokenAttention", "attention_rollout", "capture_attention", "class_token_map",
           "rollout_step"]
