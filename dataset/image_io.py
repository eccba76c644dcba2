"""Robust image loading: every failure becomes one clear :class:`ImageLoadError`.

``load_image`` applies EXIF orientation and converts every PIL mode to 8-bit
RGB (transparent pixels composited on white, 16-bit data scaled, not clipped).
:class:`SafeImageLoader` wraps it for datasets: unreadable images give
``None`` and a warning once per path instead of killing a training run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


class ImageLoadError(Exception):
    """An image could not be read; the message names the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load image {path!r}: {reason}")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-band image to 8-bit RGB.

    ``I;16*`` is 0..65535 and is divided by 257. Mode ``I`` from 16-bit PNGs is
    treated the same when its values fit 0..65535; ``F`` in 0..1 is multiplied
    by 255. Any other range is min-max scaled to 0..255.
    """
    arr = np.asarray(img, dtype=np.float64)  # (H, W)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        arr = np.zeros_like(arr)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-depth data."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    return img.convert("RGB")  # LAB, HSV, RGBX, ...: PIL's own conversion


def _exif_transpose(img: Image.Image, path: str) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored, not fatal."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - bad metadata must not drop the pixels
        logger.debug("ignoring unreadable EXIF orientation in %s: %s", path, err)
        return img


def load_image(path: str, min_side: int | None = None) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image.

    Args:
        path: file path.
        min_side: when given, a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's ``draft``)
            as long as both sides stay at least ``min_side`` pixels: several times faster for photos much
            larger than needed. Other formats are decoded whole.

    Returns:
        A fully decoded RGB image, EXIF orientation applied.

    Raises:
        ImageLoadError: missing, empty, truncated, corrupt, zero-size or
            oversized (decompression bomb) image; never a raw PIL/OS error.
    """
    if not os.path.isfile(path):
        reason = "is a directory" if os.path.isdir(path) else "file not found"
        raise ImageLoadError(path, reason)
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            if min_side is not None:
                img.draft(None, (min_side, min_side))  # no-op for formats other than JPEG
            img.load()  # force the full decode so truncation is caught here
            if img.width == 0 or img.height == 0:
                raise ImageLoadError(path, f"zero-size image {img.width}x{img.height}")
            out = to_rgb(_exif_transpose(img, path))
            if out is img:
                out = img.copy()  # detach from the file that is closed on exit
            out.load()
    except ImageLoadError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        reason = f"{type(err).__name__}: {err}".strip()
        raise ImageLoadError(path, reason) from err
    return out


class SafeImageLoader:
    """Load and transform images for a dataset, turning failures into ``None``.

    Each unreadable path is logged once (with the reason); ``num_skipped``
    counts every failed fetch. In DataLoader workers the counter lives in the
    worker process, which is why the collate function also reports drops.

    Args:
        transform: callable applied to the RGB PIL image (e.g. to a tensor).
    """

    def __init__(self, transform: Callable[[Image.Image], Any] | None) -> None:
        self.transform = transform
        self.num_skipped = 0
        self._warned: set[str] = set()

    def __call__(self, path: str) -> Any | None:
        """Return ``transform(load_image(path))`` or ``None`` if unreadable."""
        try:
            img = load_image(path)
        except ImageLoadError as err:
            self.num_skipped += 1
            if path not in self._warned:
                self._warned.add(path)
                logger.warning("skipping sample: %s", err)
            return None
        return self.transform(img) if self.transform is not None else img
