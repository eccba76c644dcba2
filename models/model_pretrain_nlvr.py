"""Text-assignment (TA) pre-training for NLVR2 (paper Sec. 5, official ``model_pretrain_nlvr.py``).

One epoch on image-caption pairs before NLVR2 fine-tuning, so that the doubled fusion layers learn to tell
two images apart. Each caption is shown with a pair of images and the ``ta_head`` says which one it
describes: with probability 2/3 its own image and a hard-negative image in random order (label 0: the first
image matches, 1: the second), with probability 1/3 two hard negatives (label 2: neither). Hard negatives
are drawn from ``softmax(image-image ITC similarity / 0.07)`` over the other images of the batch: the
official fixed 0.07, not the learnable ``temp``. ``forward`` returns ``{'loss_ta', 'acc_ta'}``.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertModel
from models.model_nlvr import fuse_pair, paired_bert_config, share_cross_attention

TA_TEMP = 0.07  # hard-coded in the official TA model
TA_CLASSES = 3  # image 1 / image 2 / neither


def ta_negative_weights(image_feat: Tensor, temp: float = TA_TEMP) -> Tensor:
    """Sampling weights (B, B) of hard-negative images: softmax over rows of ``feat @ feat.T / temp``,
    diagonal zeroed (not renormalised; ``torch.multinomial`` normalises). image_feat (B, E) normalised."""
    weights = F.softmax(image_feat.float() @ image_feat.float().t() / temp, dim=1)
    return weights.fill_diagonal_(0.0)


def sample_ta_pairs(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Draw the TA image pair and label of each caption (official sampling, vectorised).

    weights: (B, B) from :func:`ta_negative_weights`, B >= 3 (two distinct negatives must exist).
    Returns (index of image 1 (B,), index of image 2 (B,), labels (B,)): label 0 = (own, negative),
    1 = (negative, own), each with probability 1/3; 2 = two distinct negatives, probability 1/3.
    """
    bs = weights.size(0)
    if bs < 3:
        raise ValueError(f"text assignment needs at least 3 images per batch (two negatives per caption), got {bs}")
    device = weights.device
    negatives = torch.multinomial(weights, 2, replacement=False, generator=generator)  # (B, 2) distinct
    u = torch.rand(bs, generator=generator, device=device)
    side = torch.rand(bs, generator=generator, device=device)
    # official: rand > 1/3 -> own image + one negative, then rand > 0.5 -> own image first
    labels = torch.where(u > 1 / 3, torch.where(side > 0.5, 0, 1), 2)
    own = torch.arange(bs, device=device)
    first = torch.where(labels == 0, own, negatives[:, 0])
    second = torch.where(labels == 1, own, torch.where(labels == 0, negatives[:, 0], negatives[:, 1]))
    return first, second, labels


class ALBEFPretrainNLVR(ALBEFBase):
    """TA model: ViT, 18-layer bare BERT with shared pair projections, ``vision_proj``, ``text_proj``,
    ``temp``, ``ta_head`` (the official module set; only ``vision_proj`` is used, without gradient). No twins.

    ``config`` is the ordinary (12-layer) ALBEF config, as for :class:`models.model_nlvr.ALBEFNLVR`.
    """

    text_encoder: BertModel

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__(dataclasses.replace(config, bert=paired_bert_config(config.bert)), mlm_head=False,
                         momentum=False, queue=False)
        del self.itm_head
        # Entries of a pre-training checkpoint this model does not use (dropped by load_weights).
        self.unused_checkpoint_keys = re.compile(r"^itm_head\.|^[a-z_]+_m\.")
        self.task_head_keys = re.compile(r"^ta_head\.")  # new: absent from pre-training checkpoints
        self.ta_head = nn.Linear(config.bert.hidden_size, TA_CLASSES)
        share_cross_attention(self.text_encoder)
        # No gradient ever reaches these (official: vision_proj under no_grad, text_proj and temp unused), so the
        # official optimizer never changes them; frozen, they also leave DDP with no unused trainable parameter.
        for p in (*self.vision_proj.parameters(), *self.text_proj.parameters(), self.temp):
            p.requires_grad_(False)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """image (B, 3, R, R), captions (B, T) -> ``{'loss_ta': CE of ta_head, 'acc_ta': batch accuracy}``."""
        image_embeds = self.visual_encoder(image)  # (B, 1+N, D)
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)
            first, second, labels = sample_ta_pairs(ta_negative_weights(image_feat), generator)
        text_embeds = self.bert.encode_text(input_ids, attention_mask)  # (B, T, H)
        fused = fuse_pair(self.bert, text_embeds, attention_mask, image_embeds[first], image_embeds[second])
        logits = self.ta_head(fused[:, 0])  # (B, 3)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss_ta": F.cross_entropy(logits, labels), "acc_ta": acc}
