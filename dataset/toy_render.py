"""Scene geometry of the toy world: shape outlines, object placement, rendering with Pillow."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dataset.toy_scene import ALL_PAIRS, COLORS, SIZES, Scene, ToyObject

SUPERSAMPLE = 4
_RADIUS = {"small": (0.085, 0.105), "large": (0.15, 0.18)}  # fraction of the image side


# ----------------------------------------------------------------------------- geometry
def _ring(n: int, radii: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """`n` points around the centre starting at the top, cycling through `radii`."""
    angles = (-math.pi / 2 + 2 * math.pi * k / n for k in range(n))
    return tuple(
        (radii[k % len(radii)] * math.cos(t), radii[k % len(radii)] * math.sin(t))
        for k, t in enumerate(angles)
    )


def _quarter_turns(points: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """`points` followed by their three rotations by 90 degrees (a 4-fold symmetric outline)."""
    out: list[tuple[float, float]] = []
    for _ in range(4):
        out += points
        points = [(-y, x) for x, y in points]
    return tuple(out)


# ----------------------------------------------------------------------------- scenes
_ARM, _HALF = 0.9, 0.3  # cross: arm length and half width
# Unit outlines (outer radius ~1, centred, image y axis pointing down).
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _ring(48, (1.0,)),
    "square": ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)),
    "diamond": ((0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)),
    "triangle": ((0.0, -0.9), (0.95, 0.75), (-0.95, 0.75)),
    "star": _ring(10, (1.0, 0.42)),
    "cross": _quarter_turns(((-_HALF, -_ARM), (_HALF, -_ARM), (_HALF, -_HALF))),
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of `shape` centred at (cx, cy) with outer radius r."""
    return [(cx + r * x, cy + r * y) for x, y in _OUTLINES[shape]]


def make_object(shape: str, color: str, size: str, cx: float, cy: float, r: float) -> ToyObject:
    """A `ToyObject` centred at (cx, cy), outer radius r (both kept to 0.01 px); bbox: the outline's integer hull."""
    xs, ys = zip(*_polygon(shape, cx, cy, r), strict=True)
    x0, y0 = math.floor(min(xs)), math.floor(min(ys))
    box = (x0, y0, math.ceil(max(xs)) - x0, math.ceil(max(ys)) - y0)
    return ToyObject(shape, color, size, round(cx, 2), round(cy, 2), round(r, 2), box)


def sample_scene(
    rng: random.Random, image_id: int, split: str, index: int, image_size: int
) -> Scene:
    """1-4 objects with distinct (colour, shape) pairs, placed with little overlap."""
    n = rng.choices((1, 2, 3, 4), weights=(0.15, 0.35, 0.3, 0.2))[0]
    pairs = rng.sample(ALL_PAIRS, n)
    objects: list[ToyObject] = []
    for color, shape in pairs:
        size = rng.choice(SIZES)
        r = image_size * rng.uniform(*_RADIUS[size])
        for _ in range(100):  # rejection sampling; the last draw is kept if all fail
            cx, cy = rng.uniform(r + 1, image_size - r - 1), rng.uniform(r + 1, image_size - r - 1)
            if all(math.hypot(cx - o.cx, cy - o.cy) >= 0.9 * (r + o.radius) for o in objects):
                break
        objects.append(make_object(shape, color, size, cx, cy, r))
    return Scene(image_id, split, index, tuple(objects))


def render_scene(scene: Scene, image_size: int, seed: int) -> Image.Image:
    """Draw at SUPERSAMPLE x resolution, downsample (anti-aliasing), add mild pixel noise."""
    rng = np.random.default_rng([seed, scene.image_id])
    big = image_size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(222, 250, size=3))
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        pts = _polygon(
            obj.shape, obj.cx * SUPERSAMPLE, obj.cy * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        )
        draw.polygon(pts, fill=COLORS[obj.color])
    small = np.asarray(
        canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.int16
    )
    noisy = small + rng.integers(-4, 5, size=small.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
