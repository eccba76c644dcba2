"""Weakly supervised grounding accuracy from Grad-CAM maps (paper Sec. 6.4, Table 5).

As the official ``dataset/utils.py`` ``grounding_eval``: each map (G, G) is upsampled bicubically to the
image's height and width; every proposal box ``[x, y, w, h]`` scores the heat summed inside it (pixel rows
``int(y):int(y+h)``, columns ``int(x):int(x+w)``) divided by ``area ** alpha`` (``alpha = 0.5``); the best box is
correct when its IoU with the ground-truth box is at least 0.5 (the official ``computeIoU``). Accuracy is
reported per split as ``{split}_d`` (``val_d``, ``testA_d``, ``testB_d`` on RefCOCO+).

One departure: when no box scores above zero the official loop keeps the box picked for the previous
expression (its ``pred_box`` variable is never reset); here the first best-scoring box is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from dataset.grounding_dataset import RefTruth

logger = logging.getLogger(__name__)

Box = Sequence[float]  # [x, y, w, h, ...]; only the first four entries are read


def compute_iou(box1: Box, box2: Box) -> float:
    """IoU of two ``[x, y, w, h]`` boxes, the official ``computeIoU``.

    The intersection counts pixels inclusively (``x2 = x + w - 1``, area ``(x2 - x1 + 1) * (y2 - y1 + 1)``,
    and zero unless ``x1 < x2`` and ``y1 < y2``), the union uses ``w * h``: exact for integer boxes.
    """
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def upsample_map(heat: Tensor, height: int, width: int) -> Tensor:
    """(G, G) map -> (height, width), bicubic (``align_corners=False``), float32."""
    return F.interpolate(heat.float()[None, None], size=(height, width), mode="bicubic",
                         align_corners=False)[0, 0]


def box_scores(heat: Tensor, boxes: Sequence[Box], alpha: float = 0.5) -> list[float]:
    """Score of each box on an image-sized map (H, W): the heat inside it / ``(w * h) ** alpha``."""
    scores = []
    for x, y, w, h in (box[:4] for box in boxes):
        inside = heat[int(y):int(y + h), int(x):int(x + w)]
        scores.append(float(inside.sum()) / (w * h) ** alpha)
    return scores


def pick_box(heat: Tensor, boxes: Sequence[Box], alpha: float = 0.5) -> int:
    """Index of the best-scoring box (the first one among equals). ``boxes`` must not be empty."""
    if not boxes:
        raise ValueError("no proposal boxes to rank")
    scores = box_scores(heat, boxes, alpha)
    return max(range(len(scores)), key=scores.__getitem__)


def _check_refs(maps: Mapping[int, Tensor], truth: Mapping[int, RefTruth], dets: Mapping[str, list]) -> None:
    missing = [r for r in maps if r not in truth]
    if missing:
        raise KeyError(f"{len(missing)} ref_id(s) have no ground truth, e.g. {missing[:5]}")
    no_dets = sorted({truth[r].image_id for r in maps if not dets.get(str(truth[r].image_id))})
    if no_dets:
        raise KeyError(f"{len(no_dets)} image(s) have no proposals in the detection file, e.g. {no_dets[:5]}")


def ref_outcomes(
    maps: Mapping[int, Tensor], truth: Mapping[int, RefTruth], dets: Mapping[str, list], alpha: float = 0.5,
) -> dict[int, dict]:
    """The box each map picks: ``{ref_id: {"split", "box": [x, y, w, h], "iou", "correct"}}`` in the maps' order.

    Args:
        maps: ref_id -> Grad-CAM map (G, G).
        truth: ref_id -> ground truth (split, box, image id and size).
        dets: ``{str(image_id): [[x, y, w, h, ...], ...]}`` proposals (the official ``dets.json``).
        alpha: the area exponent of the box score.

    Raises:
        KeyError: a ref_id without ground truth or an image without proposals.
    """
    _check_refs(maps, truth, dets)
    out = {}
    for ref_id, heat in maps.items():
        ref = truth[ref_id]
        boxes = dets[str(ref.image_id)]
        best = list(boxes[pick_box(upsample_map(heat, ref.height, ref.width), boxes, alpha)][:4])
        iou = compute_iou(ref.bbox, best)
        out[ref_id] = {"split": ref.split, "box": best, "iou": iou, "correct": iou >= 0.5}
    return out


def split_accuracy(outcomes: Mapping[int, Mapping]) -> dict[str, float]:
    """``{f'{split}_d': fraction correct}`` of :func:`ref_outcomes` for every split, in first-seen order."""
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for row in outcomes.values():
        total[row["split"]] = total.get(row["split"], 0) + 1
        correct[row["split"]] = correct.get(row["split"], 0) + bool(row["correct"])
    return {f"{split}_d": correct[split] / total[split] for split in total}


def grounding_accuracy(
    maps: Mapping[int, Tensor], truth: Mapping[int, RefTruth], dets: Mapping[str, list], alpha: float = 0.5,
) -> dict[str, float]:
    """Accuracy per split of the boxes the maps pick: ``{f'{split}_d': fraction correct}`` for every split the
    maps cover, in first-seen order (arguments and errors: :func:`ref_outcomes`)."""
    return split_accuracy(ref_outcomes(maps, truth, dets, alpha))


def proposal_stats(ref_ids: Sequence[int], truth: Mapping[int, RefTruth], dets: Mapping[str, list]) -> dict:
    """Per split: the chance accuracy (mean of 1 / #proposals), the fewest proposals of an image and the
    share of expressions with exactly one proposal at IoU >= 0.5 (the detector's ceiling of the task)."""
    stats: dict[str, dict[str, float]] = {}
    for ref_id in ref_ids:
        ref = truth[ref_id]
        boxes = dets[str(ref.image_id)]
        hits = sum(compute_iou(ref.bbox, box[:4]) >= 0.5 for box in boxes)
        s = stats.setdefault(ref.split, {"n": 0, "chance": 0.0, "min_proposals": len(boxes), "one_hit": 0.0})
        s["n"] += 1
        s["chance"] += 1.0 / len(boxes)
        s["min_proposals"] = min(s["min_proposals"], len(boxes))
        s["one_hit"] += hits == 1
    for s in stats.values():
        s["chance"] /= s["n"]
        s["one_hit"] /= s["n"]
    return stats


def maps_by_ref(ref_ids: Tensor, maps: Tensor) -> dict[int, Tensor]:
    """(N,) ref ids and (N, G, G) maps -> {ref_id: map on the CPU}; a repeated id keeps its first map."""
    out: dict[int, Tensor] = {}
    for ref_id, heat in zip(ref_ids.tolist(), maps.detach().float().cpu(), strict=True):
        out.setdefault(int(ref_id), heat)
    return out

