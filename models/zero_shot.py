"""Zero-shot image classification with ALBEF's contrastive features (beyond the official code; the recipe of
open_clip's ``zero_shot.py``, asked for in salesforce/ALBEF#119).

Each class name is written into every prompt template (``"a photo of a {}."``); the templates' normalised ITC
text features are averaged and normalised again into one feature per class, and an image goes to the class of
highest cosine similarity with its ITC image feature. With ``rerank = r > 0`` the r best classes of each image
are ordered again by the ITM match probability of (image, prompt), averaged over the templates.
:func:`evaluate_folder` measures the accuracy over an ImageFolder-style directory ``root/<class>/<image>``.
Functions take a :class:`models.api.ALBEFInference` (``inference``), whose preprocessing they use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dataset.image_io import ImageLoadError, load_image
from models.classifier_eval import classification_metrics

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def class_texts(inference: Any, class_names: Sequence[str], templates: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of every class (class-major: class c, template t at row c * T + t) -> their text states
    (C*T, L, H), masks (C*T, L) and the class features (C, E) (template mean, normalised)."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs class names and at least one template")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds, atts, feat = inference.encode_texts(prompts)
    class_feat = F.normalize(feat.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)
    return embeds, atts, class_feat


def scores(inference: Any, image_embeds: Tensor, image_feat: Tensor, texts: tuple[Tensor, Tensor, Tensor],
           rerank: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(itc (N, C) cosine similarities, itm (N, C) ITM probabilities (NaN outside each image's reranked
    classes), predictions (N,)) for images (N, S, D) / (N, E) against :func:`class_texts` ``texts``."""
    text_embeds, text_atts, class_feat = texts
    itc = image_feat.float() @ class_feat.float().t()  # (N, C)
    n, c = itc.shape
    itm = torch.full_like(itc, float("nan"))
    predictions = itc.argmax(dim=1)
    r = min(rerank, c)
    if r > 0:
        t = text_embeds.size(0) // c  # templates per class
        top = itc.topk(r, dim=1).indices  # (N, r)
        images = torch.arange(n, device=top.device)[:, None, None].expand(n, r, t)
        prompts = (top[:, :, None] * t + torch.arange(t, device=top.device)).expand(n, r, t)
        probs = inference.itm_probabilities(image_embeds, text_embeds, text_atts, images.flatten(),
                                            prompts.flatten()).view(n, r, t).mean(dim=2)  # (N, r)
        itm.scatter_(1, top, probs.to(itm.dtype))
        predictions = top.gather(1, probs.argmax(dim=1, keepdim=True))[:, 0]
    return itc, itm, predictions


@torch.inference_mode()
def classify(inference: Any, images: Any, class_names: Sequence[str], templates: Sequence[str],
             rerank: int = 0, top_n: int = 5) -> dict[str, Any]:
    """Zero-shot classes of ``images``: ``{'classes', 'itc' (N, C), 'itm' (N, C) or None, 'predictions' [class
    index], 'top' [[(class, score)]]}``; ``top`` lists the ``top_n`` classes by ITC similarity, or with
    ``rerank`` the reranked classes by ITM probability."""
    inference._require(("pretrain", "retrieval", "grounding"), "zero-shot classification")
    texts = class_texts(inference, class_names, templates)
    image_embeds, image_feat = inference.encode_images(images)
    itc, itm, predictions = scores(inference, image_embeds, image_feat, texts, rerank)
    ranked = itm.nan_to_num(-1.0) if rerank > 0 else itc
    n = min(top_n, rerank if rerank > 0 else len(class_names))
    best = ranked.topk(n, dim=1)
    top = [[(class_names[j], v) for j, v in zip(row_j, row_v)]
           for row_j, row_v in zip(best.indices.tolist(), best.values.tolist())]
    return {"classes": list(class_names), "itc": itc.cpu(), "itm": itm.cpu() if rerank > 0 else None,
            "predictions": predictions.tolist(), "top": top}


def folder_items(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names, sorted; [(image path, class index)]) of an ImageFolder-style directory."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = [(os.path.join(root, name, f), label) for label, name in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, name))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(classes) < 2 or not items:
        raise ValueError(f"{root}: expected class folders (at least 2) holding images, found {len(classes)} "
                         f"folder(s) and {len(items)} image(s)")
    return classes, items


@torch.inference_mode()
def evaluate_folder(inference: Any, root: str, templates: Sequence[str], rerank: int = 0) -> dict[str, Any]:
    """Zero-shot accuracy over ``root/<class>/<image>`` (the class name is the folder name, ``_`` read as a space).

    Returns ``models.classifier_eval.classification_metrics`` (``acc``, ``n``, ``skipped`` unreadable images,
    ``per_class_acc``, ``confusion``, ``classes``) plus ``chance`` (100 / classes) and ``majority`` (the largest
    class's share), all in percent.
    """
    inference._require(("pretrain", "retrieval", "grounding"), "zero-shot classification")
    folders, items = folder_items(root)
    names = [f.replace("_", " ") for f in folders]
    texts = class_texts(inference, names, templates)
    rows = []
    for start in range(0, len(items), inference.batch_size):
        batch, index, labels = [], [], []
        for i, (path, label) in enumerate(items[start:start + inference.batch_size], start=start):
            try:
                batch.append(load_image(path))
            except ImageLoadError as exc:
                logger.warning("skipping %s", exc)
                continue
            index.append(i)
            labels.append(label)
        if not batch:
            continue
        image_embeds, image_feat = inference.encode_images(batch)
        predictions = scores(inference, image_embeds, image_feat, texts, rerank)[2].cpu()
        rows.append(torch.stack([torch.tensor(index), predictions, torch.tensor(labels)], dim=1))
    metrics = classification_metrics(torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long),
                                     len(items), names)
    counts = torch.bincount(torch.tensor([label for _, label in items]), minlength=len(names))
    metrics.update(chance=100.0 / len(names), majority=100.0 * counts.max().item() / len(items),
                   templates=list(templates), rerank=rerank)
    logger.info("zero-shot accuracy %.2f%% on %d images of %d classes (chance %.2f%%)", metrics["acc"],
                metrics["n"], len(names), metrics["chance"])
    return metrics
