"""Hide-and-Seek (Singh & Lee, "Hide-and-Seek: Forcing a Network to be Meticulous for Weakly-supervised Object and
Action Localization", ICCV 2017; extended in TPAMI 2018 as "Hide-and-Seek: A Data Augmentation Technique for
Weakly-Supervised Localization and Beyond").

Each training image is split into a grid of square S x S cells and every cell is hidden independently with
probability ``hide_prob`` (0.5 in the paper). S is drawn per image from ``grid_sizes``, the paper's set
{0 (no hiding), 16, 32, 44, 56} pixels. With its most discriminative part hidden now and then, the classifier has to
find the other parts of the object too, so its class maps grow. At test time nothing is hidden.

Cells index rows by the image HEIGHT and columns by the WIDTH; the last row / column holds the remainder
(H mod S, W mod S) and may be partial. (A known trap: code that swaps the two axes is right only on square
images.)

Where we differ from the paper, and why:

- Hidden pixels take the dataset mean. The paper uses the mean RGB of its training images; our images are
  normalised with the ImageNet mean and std of the pretrained backbone, so the mean is exactly 0 in normalised
  space, the same value the crop padding uses. (The paper's argument for the mean: a conv filter over a hidden
  patch then sees, in expectation, the activations it sees at test time.)
- Hiding happens after the random rescale and crop, on the network input, so S is in input pixels (the paper hides
  on its 224 x 224 inputs; our crops may be larger, e.g. 320, where the same S covers a smaller share).
- All randomness comes from the loop's per-epoch generator, so a resumed run hides the same cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method

#: the value of a hidden pixel: the (ImageNet) mean colour is 0 after normalisation
HIDDEN_VALUE = 0.0


def draw_hidden_cells(height: int, width: int, patch: int, hide_prob: float,
                      generator: torch.Generator) -> torch.Tensor:
    """The decision grid of one image: (ceil(H / patch), ceil(W / patch)) bool, True = hide that cell.

    Rows follow the height, columns the width. ``patch`` 0 means no hiding: an empty (0, 0) grid, and nothing is
    drawn from ``generator``."""
    if patch < 0:
        raise ValueError(f"patch size must be >= 0, got {patch}")
    if patch == 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    rows, cols = -(-height // patch), -(-width // patch)
    return torch.rand(rows, cols, generator=generator) < hide_prob


def cells_to_mask(cells: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Expand a decision grid to an (H, W) bool pixel mask: pixel (y, x) belongs to cell (y // patch, x // patch)."""
    if patch == 0 or cells.numel() == 0:
        return torch.zeros(height, width, dtype=torch.bool)
    ys = torch.arange(height) // patch
    xs = torch.arange(width) // patch
    return cells[ys[:, None], xs[None, :]]


def hide_mask(height: int, width: int, patch: int, hide_prob: float, generator: torch.Generator) -> torch.Tensor:
    """(H, W) bool mask of the hidden pixels of one image with cells of ``patch`` pixels."""
    return cells_to_mask(draw_hidden_cells(height, width, patch, hide_prob, generator), patch, height, width)


def hide_and_seek(images: torch.Tensor, grid_sizes: Sequence[int], hide_prob: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide random cells of every image of a (B, C, H, W) batch.

    Draw order (part of the contract, so runs are reproducible): first one patch size per image, uniformly from
    ``grid_sizes``; then each image's cell grid (:func:`draw_hidden_cells`), in batch order.
    Returns the images with hidden pixels set to :data:`HIDDEN_VALUE`, and the (B, H, W) bool hidden masks."""
    b, _, h, w = images.shape
    choice = torch.randint(len(grid_sizes), (b,), generator=generator)
    masks = torch.stack([hide_mask(h, w, grid_sizes[i], hide_prob, generator) for i in choice.tolist()])
    masks = masks.to(images.device)
    return images.masked_fill(masks[:, None], HIDDEN_VALUE), masks


@dataclass
class HideAndSeekOptions:
    #: cell sizes in input pixels, one drawn per image; 0 = that image is not hidden (paper: 0, 16, 32, 44, 56)
    grid_sizes: tuple[int, ...] = (0, 16, 32, 44, 56)
    #: probability of hiding each cell (paper: 0.5)
    hide_prob: float = 0.5

    def __post_init__(self):
        if not self.grid_sizes:
            raise ConfigError("method.options.grid_sizes: give at least one cell size (0 = no hiding)")
        if any(s < 0 for s in self.grid_sizes):
            raise ConfigError(f"method.options.grid_sizes: sizes must be >= 0 pixels, got {list(self.grid_sizes)}")
        if not 0.0 <= self.hide_prob <= 1.0:
            raise ConfigError(f"method.options.hide_prob: must be in [0, 1], got {self.hide_prob}")


@METHODS.register("hide_and_seek")
class HideAndSeek(Method):
    name = "hide_and_seek"
    Options = HideAndSeekOptions

    def transform_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images, _ = hide_and_seek(batch["image"], self.options.grid_sizes, self.options.hide_prob, generator)
        return {**batch, "image": images}
