"""Evaluation of the fused-[CLS] classifiers (SNLI-VE, NLVR2): predictions, accuracy, per-class accuracy, confusion.

Under ``torchrun`` each rank classifies a contiguous share of the dataset (``engine.distributed.shard_range``)
and the shares are gathered in rank order, so every example counts exactly once (the official evaluation
pads its ``DistributedSampler`` and counts a few examples twice). Examples whose image is unreadable are
dropped by the shared collate and reported as ``skipped``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dataset import collate_skip_none
from engine import distributed
from models.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


class _Indexed(Dataset):
    """``dataset[indices[i]]`` with its index in front: ``(index, *item)``, or None for a dropped item."""

    def __init__(self, dataset: Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple | None:
        item = self.dataset[self.indices[i]]
        return None if item is None else (self.indices[i], *item)


def _autocast(device: torch.device, amp: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, tokenizer: TextTokenizer, device: torch.device,
            batch_size: int, max_tokens: int, num_workers: int = 0, amp: str = "off") -> Tensor:
    """Classify every item of ``dataset`` -> (n, 3) long rows ``(item index, predicted class, label)`` in item order.

    Dataset items are ``(image, sentence, label)`` (SNLI-VE) or ``(image0, image1, sentence, label)`` (NLVR2:
    the model gets the first images, then the second images, as one (2B, 3, R, R) batch). ``model.logits``
    gives the class logits. Every rank returns the gathered rows of all ranks.
    """
    model.eval()
    shard = _Indexed(dataset, range(*distributed.shard_range(len(dataset))))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_none, pin_memory=device.type == "cuda")
    rows = []
    for batch in loader:
        if len(batch) == 1:  # every image of the batch was unreadable
            continue
        index, *images, sentences, labels, _ = batch
        image = torch.cat(images).to(device, non_blocking=True)  # (B or 2B, 3, R, R)
        text = tokenizer(sentences, max_length=max_tokens).to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model.logits(image, text.input_ids, text.attention_mask)  # (B, C)
        rows.append(torch.stack([index, logits.argmax(dim=1).cpu(), labels], dim=1))
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)
    gathered = distributed.all_gather_uneven(local.to(distributed.collective_device()))
    return gathered.cpu()


def classification_metrics(rows: Tensor, num_items: int, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of ``predict``'s rows: ``acc`` (%), ``n``, ``skipped``, ``per_class_acc`` ({class: % of its
    items predicted right}), ``confusion`` (``confusion[true][predicted]`` counts, classes in index order)."""
    pred, label = rows[:, 1], rows[:, 2]
    k = len(class_names)
    confusion = torch.bincount(label * k + pred, minlength=k * k).reshape(k, k)  # (true, predicted)
    per_class = {name: 100.0 * confusion[c, c].item() / max(1, confusion[c].sum().item())
                 for c, name in enumerate(class_names)}
    n = rows.size(0)
    return {"acc": 100.0 * (pred == label).sum().item() / max(1, n), "n": n, "skipped": num_items - n,
            "per_class_acc": per_class, "confusion": confusion.tolist(), "classes": list(class_names)}


def prediction_rows(rows: Tensor, dataset: Dataset, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """``predict``'s rows as one dict per classified item, in item order: ``index`` (position in the split's
    annotation files, concatenated), ``sentence`` (as in the file), ``label`` and ``prediction`` (class names).
    ``dataset.ann`` holds the items (``NLVRDataset``, ``VEDataset``)."""
    return [{"index": i, "sentence": dataset.ann[i]["sentence"], "label": class_names[label],
             "prediction": class_names[pred]} for i, pred, label in rows.tolist()]


def evaluate_classifier(model: torch.nn.Module, dataset: Dataset, tokenizer: TextTokenizer, device: torch.device,
                        class_names: Sequence[str], batch_size: int, max_tokens: int, num_workers: int = 0,
                        amp: str = "off") -> dict[str, Any]:
    """:func:`predict` then :func:`classification_metrics` (the same dict on every rank), with the items'
    :func:`prediction_rows` under ``predictions``."""
    rows = predict(model, dataset, tokenizer, device, batch_size, max_tokens, num_workers, amp)
    metrics = classification_metrics(rows, len(dataset), class_names)
    metrics["predictions"] = prediction_rows(rows, dataset, class_names)
    if metrics["skipped"]:
        logger.warning("%d of %d evaluation items skipped (unreadable images)", metrics["skipped"], len(dataset))
    logger.info("accuracy %.2f on %d items", metrics["acc"], metrics["n"])
    return metrics
