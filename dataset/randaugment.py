"""RandAugment on PIL images with the magnitudes of the official ALBEF code.

The official implementation works on numpy arrays with OpenCV; this one uses
PIL with the same op list, level-to-argument mapping, probabilities and fill
value. Randomness comes from Python's ``random`` module, which PyTorch seeds
in every DataLoader worker (numpy's global RNG is not re-seeded per worker).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
TRANSLATE_CONST = 10.0  # pixels at full magnitude (official ``translate_const``)
REPLACE_VALUE = (128, 128, 128)  # fill for pixels uncovered by geometric ops
APPLY_PROB = 0.5

DEFAULT_AUGS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def _random_sign(value: float) -> float:
    """Negate ``value`` with probability 0.5 (official: ``random() > 0.5``)."""
    return -value if random.random() > 0.5 else value


def _fill_for(img: Image.Image) -> int | tuple[int, ...]:
    """Fill colour matching the image mode (grey 128)."""
    return REPLACE_VALUE if len(img.getbands()) == 3 else REPLACE_VALUE[0]


def _affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
    """Affine warp; ``data`` maps output (x, y) to input coordinates."""
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        data,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_fill_for(img),
    )


def _identity(img: Image.Image) -> Image.Image:
    return img


def _autocontrast(img: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image) -> Image.Image:
    return ImageOps.equalize(img)


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def _sharpness(img: Image.Image, factor: float) -> Image.Image:
    # PIL's SMOOTH kernel (1s around a centre 5, /13) is the official kernel.
    return ImageEnhance.Sharpness(img).enhance(factor)


def _shear_x(img: Image.Image, factor: float) -> Image.Image:
    # Official forward map x' = x + factor * y, so the inverse reads x' - factor * y.
    return _affine(img, (1.0, -factor, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img: Image.Image, factor: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.0))


def _translate_x(img: Image.Image, offset: float) -> Image.Image:
    # Official forward map x' = x - offset, so the output pixel reads x' + offset.
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def _translate_y(img: Image.Image, offset: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    # Counter-clockwise about the centre, like cv2.getRotationMatrix2D.
    return img.rotate(
        degrees, resample=Image.Resampling.BILINEAR, fillcolor=_fill_for(img)
    )


OPS: dict[str, Callable[..., Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


def level_to_args(name: str, level: float) -> tuple[float, ...]:
    """Map a magnitude level (0..MAX_LEVEL) to the op's arguments.

    Geometric ops draw a random sign from ``random``.

    Args:
        name: op name, a key of :data:`OPS`.
        level: magnitude level ``m``.

    Returns:
        The positional arguments passed to the op after the image.
    """
    frac = level / MAX_LEVEL
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (_random_sign(frac * 0.3),)
    if name in ("TranslateX", "TranslateY"):
        return (_random_sign(frac * TRANSLATE_CONST),)
    if name == "Rotate":
        return (_random_sign(frac * 30.0),)
    raise KeyError(f"unknown RandomAugment op {name!r}; known: {sorted(OPS)}")


class RandomAugment:
    """Apply ``n`` ops drawn with replacement from ``augs``, each with p=0.5.

    Args:
        n: number of ops drawn per call.
        m: magnitude level out of :data:`MAX_LEVEL`.
        augs: op names; defaults to the official list :data:`DEFAULT_AUGS`.
    """

    def __init__(
        self, n: int = 2, m: float = 7, augs: Sequence[str] | None = None
    ) -> None:
        self.n = n
        self.m = m
        self.augs = list(DEFAULT_AUGS if augs is None else augs)
        unknown = [a for a in self.augs if a not in OPS]
        if unknown:
            raise KeyError(f"unknown RandomAugment ops {unknown}; known: {sorted(OPS)}")
        if not self.augs:
            raise ValueError("RandomAugment needs at least one op")

    def get_random_ops(self) -> list[tuple[str, float, float]]:
        """Draw ``n`` ``(name, prob, level)`` triples uniformly with replacement."""
        names = random.choices(self.augs, k=self.n)
        return [(name, APPLY_PROB, self.m) for name in names]

    def __call__(self, img: Image.Image) -> Image.Image:
        """Augment a PIL image and return a PIL image of the same size and mode."""
        for name, prob, level in self.get_random_ops():
            if random.random() > prob:
                continue
            img = OPS[name](img, *level_to_args(name, level))
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m}, augs={self.augs})"
