"""Image transforms of the official ALBEF recipes (CLIP normalisation)."""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.randaugment import DEFAULT_AUGS, RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Default RandomResizedCrop scale per kind (None: resize without cropping).
_DEFAULT_SCALE: dict[str, tuple[float, float] | None] = {
    "pretrain": (0.2, 1.0),
    "train": (0.5, 1.0),
    "grounding_train": None,
    "test": None,
}


def normalize() -> transforms.Normalize:
    """The CLIP mean/std normalisation used by every ALBEF task."""
    return transforms.Normalize(CLIP_MEAN, CLIP_STD)


def build_transform(
    kind: str,
    image_res: int,
    crop_scale: tuple[float, float] | None = None,
    randaug: bool = True,
) -> Callable:
    """Build the PIL -> tensor transform of an official recipe.

    Args:
        kind: ``'pretrain'`` (crop scale 0.2-1), ``'train'`` (fine-tuning, 0.5-1),
            ``'grounding_train'`` (square resize, flip, RandAugment) or ``'test'``
            (square bicubic resize only).
        image_res: output side length in pixels.
        crop_scale: overrides the RandomResizedCrop scale of 'pretrain'/'train'.
        randaug: include ``RandomAugment(2, 7)`` in the training kinds.

    Returns:
        A callable mapping an RGB PIL image to a float tensor (3, image_res, image_res).
    """
    if kind not in _DEFAULT_SCALE:
        raise ValueError(
            f"unknown transform kind {kind!r}; expected one of {sorted(_DEFAULT_SCALE)}"
        )
    bicubic = InterpolationMode.BICUBIC
    resize = transforms.Resize((image_res, image_res), interpolation=bicubic)
    if kind == "test":
        return transforms.Compose([resize, transforms.ToTensor(), normalize()])

    if kind == "grounding_train":
        steps: list[Callable] = [resize]
    else:
        scale = crop_scale if crop_scale is not None else _DEFAULT_SCALE[kind]
        steps = [
            transforms.RandomResizedCrop(image_res, scale=scale, interpolation=bicubic)
        ]
    steps.append(transforms.RandomHorizontalFlip())
    if randaug:
        steps.append(RandomAugment(2, 7, augs=DEFAULT_AUGS))
    steps += [transforms.ToTensor(), normalize()]
    return transforms.Compose(steps)
