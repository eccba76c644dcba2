"""The toy world's stand-in for DeiT: a supervised ImageNet-style pre-training of the toy ViT, for ``vit_init``.

The paper's pre-training starts its ViT from DeiT-B/16 trained on ImageNet-1k (section 4); nothing pre-trained is
available offline, so this trains the toy-sized ViT to classify toy images by the objects they contain: a
multi-label target over the shapes, colours and (colour, shape) pairs present, binary cross-entropy on a linear
head over the [CLS] state. The images come from a separate toy world (its own seed, default
``data/toy_imagenet``), so the ViT never sees the task worlds' images, as DeiT never saw COCO's test images.

DeiT-B/16's patch tokens carry what lies under them; image-level labels alone need not teach the toy ViT's patch
tokens that. ``--patch_weight W`` adds W times a per-patch cross-entropy over the
(colour, shape) pair of the object covering the patch (or background; see ``patch_labels``) through a linear head
that is not saved, so that the patch tokens, which the fusion layers' cross-attention reads, say which object
they show. The README's toy pipeline uses ``--patch_weight 1``.

    python scripts/toy_vit_init.py --config configs/toy/Pretrain.yaml --out output/toy_vit/vit_init.pth \
        --patch_weight 1
    python Pretrain.py --config configs/toy/Pretrain.yaml --output_dir output/toy_pretrain_vit \
        --override vit_init=output/toy_vit/vit_init.pth

The file holds ``{'model': state}`` with timm's ViT names and the ``head.*`` classifier (dropped by ``vit_init``).
Logs the step's loss and, every ``--eval_every`` steps, the validation accuracy of the shape labels and of all labels
(and, with ``--patch_weight``, of the object-covered patches' pair classes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("albef.toy_vit_init")


def object_labels(world: str, split: str) -> tuple[list[str], Tensor, list[str]]:
    """Image paths of ``split`` and their (N, L) multi-hot targets over L = shapes + colours + (colour, shape)
    pairs, with the L label names."""
    from dataset.toy_scene import ALL_PAIRS, COLORS, SHAPES

    with open(os.path.join(world, "scenes.json"), encoding="utf-8") as f:
        scenes = [s for s in json.load(f) if s["split"] == split]
    names = [*SHAPES, *COLORS, *(f"{c} {s}" for c, s in ALL_PAIRS)]
    index = {name: k for k, name in enumerate(names)}
    targets = torch.zeros(len(scenes), len(names))
    for row, scene in enumerate(scenes):
        for obj in scene["objects"]:
            for name in (obj["shape"], obj["color"], f"{obj['color']} {obj['shape']}"):
                targets[row, index[name]] = 1.0
    return [os.path.join(world, s["image"]) for s in scenes], targets, names


def patch_labels(world: str, split: str, image_res: int, patch_size: int) -> Tensor:
    """(N, G, G) per-patch targets of ``split``'s images, G = image_res / patch_size: 0 for background, else
    1 + the index in ``ALL_PAIRS`` of the (colour, shape) of the object covering most of the patch.

    An object's pixels are those inside its bounding box within distance 60 (RGB) of its colour; a patch counts as
    covered when at least a quarter of its pixels belong to one object. Requires the world's own image size to be
    ``image_res``.
    """
    import numpy as np
    from PIL import Image

    from dataset.toy_scene import ALL_PAIRS, COLORS

    with open(os.path.join(world, "scenes.json"), encoding="utf-8") as f:
        scenes = [s for s in json.load(f) if s["split"] == split]
    grid = image_res // patch_size
    pair_index = {pair: k + 1 for k, pair in enumerate(ALL_PAIRS)}
    out = torch.zeros(len(scenes), grid, grid, dtype=torch.long)
    for row, scene in enumerate(scenes):
        pixels = np.asarray(Image.open(os.path.join(world, scene["image"])).convert("RGB"), dtype=np.int32)
        if pixels.shape[:2] != (image_res, image_res):
            raise ValueError(f"{scene['image']}: {pixels.shape[1]}x{pixels.shape[0]} px, patch labels need "
                             f"image_res {image_res}")
        owner = np.zeros(pixels.shape[:2], dtype=np.int64)  # (R, R) label of each pixel
        for obj in scene["objects"]:
            x, y, w, h = obj["bbox"]
            box = pixels[max(y, 0):y + h, max(x, 0):x + w]
            near = ((box - np.array(COLORS[obj["color"]])) ** 2).sum(-1) < 60 ** 2
            owner[max(y, 0):y + h, max(x, 0):x + w][near] = pair_index[(obj["color"], obj["shape"])]
        patches = owner.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
        counts = np.stack([(patches == k).sum(-1) for k in range(len(ALL_PAIRS) + 1)], -1)  # (G, G, 1 + P)
        counts[..., 0] = 0
        best = counts.argmax(-1)
        best[counts.max(-1) * 4 < patch_size ** 2] = 0
        out[row] = torch.from_numpy(best)
    return out


def load_images(paths: list[str], image_res: int) -> Tensor:
    """(N, 3, R, R) images through the ALBEF test transform (resize, CLIP normalisation)."""
    from dataset import build_transform
    from dataset.image_io import load_image

    transform = build_transform("test", image_res)
    return torch.stack([transform(load_image(p)) for p in paths])


def evaluate(model: nn.Module, images: Tensor, targets: Tensor, patch_targets: Tensor | None = None
             ) -> dict[str, float]:
    """Accuracy of the shape-presence labels (logit > 0 against the target; the first len(SHAPES) labels of
    ``object_labels``) and of all labels; with ``patch_targets`` (N, G, G) and a patch head, also the percent of
    the object-covered patches (target > 0) whose (colour, shape) class is predicted. One pass over ``images``."""
    from dataset.toy_scene import SHAPES

    model.eval()
    with torch.no_grad():
        outputs = [model(images[i:i + 256]) for i in range(0, len(images), 256)]
    model.train()
    right = (torch.cat([labels for labels, _ in outputs]) > 0).float() == targets
    metrics = {"shape_acc": round(right[:, :len(SHAPES)].float().mean().item() * 100, 2),
               "label_acc": round(right.float().mean().item() * 100, 2)}
    if patch_targets is not None:
        predicted = torch.cat([patches.argmax(-1) for _, patches in outputs]).flatten()
        covered = patch_targets.flatten() > 0
        patch_right = predicted[covered] == patch_targets.flatten()[covered]
        metrics["object_patch_acc"] = round(patch_right.float().mean().item() * 100, 2)
    return metrics


def train(config: dict, args: argparse.Namespace) -> dict[str, float]:
    """Train the classifier; saves ``args.out``; returns the last validation metrics."""
    from dataset.toy_scene import ALL_PAIRS
    from dataset.toy_world import ensure_toy_world
    from models.vit import build_vit, vit_sizes

    world = ensure_toy_world(args.world, seed=args.world_seed, n_train=args.n_train, n_val=args.n_val, n_test=2,
                             image_size=int(config["image_res"]))
    train_paths, train_y, _ = object_labels(world, "train")
    val_paths, val_y, _ = object_labels(world, "val")
    x_train, x_val = load_images(train_paths, config["image_res"]), load_images(val_paths, config["image_res"])
    vit = build_vit(**vit_sizes(config))
    vit.reset_classifier(train_y.shape[1], global_pool="token")
    model = _Classifier(vit, n_patch_classes=len(ALL_PAIRS) + 1 if args.patch_weight > 0 else 0)
    train_patch_y = val_patch_y = None
    if args.patch_weight > 0:
        patch = int(config["vit"]["patch_size"])
        train_patch_y = patch_labels(world, "train", config["image_res"], patch)
        val_patch_y = patch_labels(world, "val", config["image_res"], patch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    metrics: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=generator)
        images = x_train[idx]
        flip = torch.rand(len(idx), generator=generator) < 0.5  # the pre-training's horizontal flip
        images[flip] = images[flip].flip(-1)
        logits, patch_logits = model(images)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, train_y[idx])
        if args.patch_weight > 0:
            targets = train_patch_y[idx]  # (B, G, G)
            targets[flip] = targets[flip].flip(-1)
            loss = loss + args.patch_weight * nn.functional.cross_entropy(patch_logits.flatten(0, 1),
                                                                          targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            metrics = {"step": step, "loss": round(loss.item(), 4), **evaluate(model, x_val, val_y, val_patch_y)}
            logger.info("%s", json.dumps(metrics))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": vit.state_dict(), "metrics": metrics}, args.out)
    logger.info("saved %s", args.out)
    return metrics


class _Classifier(nn.Module):
    """ViT [CLS] state -> object-label logits through timm's ``head``; with ``n_patch_classes``, also each patch
    token -> its (colour, shape) class logits through a linear ``patch_head`` (not saved)."""

    def __init__(self, vit: nn.Module, n_patch_classes: int = 0) -> None:
        super().__init__()
        self.vit = vit
        self.patch_head = nn.Linear(vit.embed_dim, n_patch_classes) if n_patch_classes else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:  # (B, 3, R, R) -> (B, L), (B, N, C)
        tokens = self.vit.forward_features(images)  # (B, 1 + N, D)
        patch_logits = self.patch_head(tokens[:, 1:]) if self.patch_head is not None else None
        return self.vit.head(tokens[:, 0]), patch_logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/toy/Pretrain.yaml", help="the ViT sizes and image_res")
    parser.add_argument("--out", default="output/toy_vit/vit_init.pth")
    parser.add_argument("--world", default="data/toy_imagenet", help="the classification images' toy world")
    parser.add_argument("--world_seed", type=int, default=1, help="its seed (the task world's is 0)")
    parser.add_argument("--n_train", type=int, default=6000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch_weight", type=float, default=0.0,
                        help="weight of a per-patch (colour, shape) cross-entropy beside the [CLS] labels (0: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ruamel.yaml import YAML

    with open(args.config, encoding="utf-8") as f:
        config = YAML(typ="safe").load(f)
    torch.manual_seed(args.seed)
    return train(config, args)


if __name__ == "__main__":
    main()
