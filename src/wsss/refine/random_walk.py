"""The random walk of affinity refinement, shared by IRN and PSA: pixel pairs within a radius, the sparse transition
built from their affinities, and the walk of localization maps along it.

PSA (Ahn & Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision", CVPR 2018) and IRN (Ahn, Cho
& Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel Relations", CVPR 2019) propagate map
scores with a random walk whose transition comes from a learned semantic affinity ``A`` between pixels closer than
a radius::

    T = D^-1 A^(elementwise beta),   D = diag(sum_j A_ij^beta),   maps <- T applied t times

What carries over from the papers (their code, which fixes what the equations leave open):

- **Pairs**: offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2`` (radius 5 reaches 4 pixels). ``A`` is symmetric,
  ``A_ii = 1``, zero beyond the radius and outside the image. A network computes each pair once, over the *half*
  neighbourhood :func:`half_offsets` (``(0, dx > 0)`` and ``dy > 0``); the other half is its mirror.
- **Normalisation**: each pixel's new score is the ``A^beta``-weighted mean of its neighbours' scores (the papers'
  code divides ``A^beta`` by its column sums and multiplies a row of scores from the left). So the weights a pixel
  averages over sum to 1 and a constant map is a fixed point. What the walk conserves is the degree-weighted mass
  ``sum_i d_i x_i`` (``d_i = sum_j A_ij^beta``) of every class, not the plain sum ``sum_i x_i``: that would be the
  transposed walk, "every pixel hands its score out to its neighbours", which the papers do not use.
- **Steps**: ``t = 256`` (the code squares ``T`` eight times: 2^8).

Where we differ: the papers build the dense N x N matrix and square it (N = pixels at the feature stride: O(N^2)
memory, O(N^3) time). We never build it. The transition is held as weights over the K disc offsets of each pixel
(:class:`Transition`); one step sums each pixel's neighbours weighted (a multiply-add of a shifted view per offset),
for every channel (class) at once, in float32; ``t`` steps are ``t`` such sweeps: O(t K N) time, O(K N) memory. The
result equals the dense computation up to float rounding (``tests/test_affinity.py`` checks it against a dense
reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

Offset = tuple[int, int]


def half_offsets(radius: int) -> list[Offset]:
    """The papers' search directions: ``(0, dx)`` for ``0 < dx < radius``, then ``(dy, dx)`` for ``0 < dy < radius``
    with ``dy^2 + dx^2 < radius^2``. With their mirrors and ``(0, 0)`` they are the disc of the radius."""
    r = int(radius)
    out = [(0, dx) for dx in range(1, r)]
    out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r]
    return out


def gather_offsets(t: torch.Tensor, offsets: Sequence[Offset], fill: float | int) -> torch.Tensor:
    """``(..., h, w) -> (..., K, h, w)``: ``out[..., k, y, x] = t[..., y + dy_k, x + dx_k]``, ``fill`` where that
    falls outside the image."""
    h, w = t.shape[-2:]
    pad = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)
    p = F.pad(t, (pad, pad, pad, pad), value=fill) if pad else t
    return torch.stack([p[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets], dim=-3)


def pair_inside(h: int, w: int, offsets: Sequence[Offset], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(K, h, w)`` bool: the pair ``(y, x) -> (y + dy, x + dx)`` lies inside the image."""
    return gather_offsets(torch.ones(h, w, dtype=torch.bool, device=device), offsets, False)


def disc_offsets(radius: int) -> list[Offset]:
    """Every offset of the disc: ``(0, 0)``, the half neighbourhood, then its mirror (the order of
    :func:`disc_affinity`)."""
    half = half_offsets(radius)
    return [(0, 0), *half, *[(-dy, -dx) for dy, dx in half]]


def disc_affinity(half: torch.Tensor, radius: int) -> torch.Tensor:
    """Affinities of the half neighbourhood ``(..., Kh, h, w)`` (in :func:`half_offsets` order) -> ``(..., K, h, w)``
    over the whole disc (:func:`disc_offsets`, ``K = 2 Kh + 1``): 1 at ``(0, 0)``, the half affinity, then its mirror
    ``A(j, j - o) = A(j - o, j)``; 0 for a neighbour outside the image."""
    offsets = half_offsets(radius)
    if half.shape[-3] != len(offsets):
        raise ValueError(f"disc_affinity: {half.shape[-3]} half-neighbourhood affinities for radius {radius}, "
                         f"which has {len(offsets)} pairs per pixel")
    h, w = half.shape[-2:]
    half = half * pair_inside(h, w, offsets, half.device)  # a pair leaving the image has no affinity
    # pixel j pairs with j - o: that pair's affinity was computed at j - o, so it is read there
    mirror = torch.stack([gather_offsets(half[..., k, :, :], [(-dy, -dx)], 0.0)[..., 0, :, :]
                          for k, (dy, dx) in enumerate(offsets)], dim=-3)
    return torch.cat([torch.ones_like(half[..., :1, :, :]), half, mirror], dim=-3)


class Transition:
    """The sparse transition ``D^-1 A^beta`` of one image: for every pixel, the normalised weights over its disc.

    ``half``: ``(Kh, h, w)`` affinities in [0, 1] of the half neighbourhood of ``radius`` (see
    :func:`disc_affinity`). ``weights``: ``(K, h, w)`` over :func:`disc_offsets`, summing to 1 at every pixel;
    ``degree``: ``(h, w)``, the ``d_i`` that weight the mass the walk conserves.
    """

    def __init__(self, half: torch.Tensor, radius: int, beta: float):
        if half.ndim != 3:
            raise ValueError(f"Transition: expected (K, h, w) affinities, got shape {tuple(half.shape)}")
        self.radius = int(radius)
        self.offsets = disc_offsets(self.radius)
        self.h, self.w = half.shape[-2:]
        a = disc_affinity(half.float().clamp(0.0, 1.0), self.radius) ** float(beta)
        self.degree = a.sum(0)  # >= 1: a pixel's affinity to itself is 1
        self.weights = a / self.degree

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step for every channel of ``x`` ``(C, h, w)``: each pixel's weighted mean over its disc. One
        multiply-add of a shifted view per offset (on CPU an order of magnitude faster than ``unfold``)."""
        r, h, w = self.radius - 1, self.h, self.w
        p = F.pad(x, (r, r, r, r))
        out = torch.zeros_like(x)
        for k, (dy, dx) in enumerate(self.offsets):
            out.addcmul_(p[:, r + dy : r + dy + h, r + dx : r + dx + w], self.weights[k])
        return out

    def __call__(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        if x.shape[-2:] != (self.h, self.w):
            raise ValueError(f"Transition: maps of size {tuple(x.shape[-2:])} for a {self.h}x{self.w} transition")
        x = x.float()
        for _ in range(int(steps)):
            x = self.step(x)
        return x


def random_walk(scores: torch.Tensor, half: torch.Tensor, radius: int, beta: float, steps: int) -> torch.Tensor:
    """``scores`` ``(C, h, w)`` after ``steps`` steps of the transition of the half-neighbourhood affinities
    ``half`` ``(Kh, h, w)``, all channels at once, float32."""
    return Transition(half, radius, beta)(scores, steps)


__all__ = ["Offset", "Transition", "disc_affinity", "disc_offsets", "gather_offsets", "half_offsets", "pair_inside",
           "random_walk"]
