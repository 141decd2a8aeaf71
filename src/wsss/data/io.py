"""Reading images and masks with errors that name the file, and writing palette PNGs.

Images of any mode (grayscale, palette, RGBA, CMYK, 16-bit) are converted to 8-bit RGB: the colour terms of a CRF
and the network's normalisation both expect that. A photo's EXIF orientation tag (phones store portrait photos as
landscape pixels plus a rotation) is applied, so the image is the one viewers show, and a mask drawn on it fits; the
size read from the header (:func:`image_size`) is that of the rotated image too. Masks must be single-channel index
images of the same size as their image, holding class indices or the ignore index.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss.errors import DataError
from wsss.runs import atomic_write_bytes


def load_image(path: str | Path) -> np.ndarray:
    """Return the image as an HxWx3 uint8 RGB array."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not deep inside a worker later
            return pil_to_rgb(upright(img))
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image (corrupt or truncated file?): {e}") from None


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (as image viewers show it); ``img`` itself where the tag is
    absent or 1 (an image already turned by :func:`PIL.ImageOps.exif_transpose` has lost its tag: no second turn)."""
    return ImageOps.exif_transpose(img) if _orientation(img) != 1 else img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored), 1 where there is none or it cannot be read."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return 1


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode (16-bit grey scaled to 8 bits) as an HxWx3 uint8 RGB array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    return np.asarray(rgb, dtype=np.uint8).copy()


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header only, after the EXIF orientation (as :func:`load_image` returns it)."""
    try:
        with Image.open(path) as img:
            # orientations 5-8 turn the image by 90 degrees
            turned = _orientation(img) in (5, 6, 7, 8)
            return (img.width, img.height) if turned else (img.height, img.width)
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image header: {e}") from None


def load_mask(
    path: str | Path,
    num_classes: int,
    ignore_index: int = 255,
    expected_hw: tuple[int, int] | None = None,
    lut: np.ndarray | None = None,
) -> np.ndarray:
    """Return the mask as an HxW uint8 array of class indices (``ignore_index`` = unlabelled).

    ``lut`` (256 entries) remaps values after validation, e.g. classes mapped to background.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: mask has mode {img.mode}; expected a single-channel index PNG (mode P or L) "
                    "holding class indices, not colours"
                )
            mask = np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: mask file does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode mask: {e}") from None
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            f"{path}: mask values {bad.tolist()} are neither a class index (0..{num_classes - 1}) "
            f"nor the ignore index {ignore_index}"
        )
    if lut is not None:
        mask = lut[mask]
    return mask


def mask_to_png_bytes(mask: np.ndarray, palette: bytes) -> bytes:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_mask_png(path: str | Path, mask: np.ndarray, palette: bytes) -> None:
    """Write a palette PNG atomically (a killed run never leaves a half-written mask)."""
    atomic_write_bytes(Path(path), mask_to_png_bytes(mask, palette))
