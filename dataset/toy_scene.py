"""Scene model of the toy world: its vocabulary, objects, scenes and the relations captions may state.

`dataset.toy_render` samples and draws scenes, `dataset.toy_captions` and `dataset.toy_tasks` describe them.
Vertical relations ("above"/"below") are used only between objects whose bounding boxes are
vertically disjoint, so every statement stays true under the horizontal flips used in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 150, 50),
    "blue": (30, 80, 220),
    "yellow": (235, 195, 20),
    "purple": (140, 50, 175),
    "orange": (250, 125, 15),
    "black": (25, 25, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class ToyObject:
    """One rendered object; geometry in output-image pixels, `bbox` is `[x, y, w, h]`."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    bbox: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One image: its split, per-split index, global integer id and objects."""

    image_id: int
    split: str
    index: int
    objects: tuple[ToyObject, ...]

    @property
    def image(self) -> str:
        """Image path relative to the world root."""
        return f"images/{self.split}/{self.index:05d}.png"

    @property
    def key(self) -> str:
        return f"{self.split}_{self.index:05d}"

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape in (None, o.shape)) and (color in (None, o.color)) for o in self.objects)


def is_above(a: ToyObject, b: ToyObject) -> bool:
    """True when `a` lies entirely above `b` (bounding boxes vertically disjoint)."""
    return a.bbox[1] + a.bbox[3] <= b.bbox[1]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def counted(n: int, noun: str = "shape") -> str:
    """'one shape', 'three shapes'."""
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (colour, shape) pair that is not in the scene."""
    taken = scene.pairs()
    return rng.choice([pair for pair in ALL_PAIRS if pair not in taken])


def vertical_pairs(scene: Scene) -> list[tuple[ToyObject, ToyObject]]:
    """All (upper, lower) object pairs with a clear vertical relation."""
    return [(a, b) for a in scene.objects for b in scene.objects if is_above(a, b)]
