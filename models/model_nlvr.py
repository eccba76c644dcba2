"""ALBEF for NLVR2: one sentence, two images (paper Sec. 5 and Fig. 3b, official ``model_nlvr.py``).

The fusion part of BERT is doubled: each fusion layer becomes two consecutive blocks (self-attention,
cross-attention, feed-forward), the first attending to image 1 and the second to image 2, so a 12-layer BERT
with ``fusion_layer`` 6 has 18 layers and layer ``l >= fusion_layer`` reads image ``(l - fusion_layer) % 2``.
The two cross-attention blocks of a pair share one key and one value projection: one ``nn.Linear`` object
registered under both layers, so the state dict holds both names (as the released checkpoints do) and the
optimizer sees one parameter. A 12-layer checkpoint is mapped onto the pairs by ``models.checkpoint``.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from models.albef import ALBEFConfig
from models.bert import CLS, BertConfig, BertModel, extended_mask
from models.model_ve import ALBEFClassifier


def paired_bert_config(bert: BertConfig) -> BertConfig:
    """The BERT config with every fusion layer doubled: 12 layers, fusion 6 -> 18 layers (official NLVR)."""
    n_fusion = bert.num_hidden_layers - bert.fusion_layer
    return dataclasses.replace(bert, num_hidden_layers=bert.fusion_layer + 2 * n_fusion)


def share_cross_attention(bert: BertModel) -> None:
    """Make the second block of each fusion pair use the first block's cross-attention key and value modules.

    Official ``share_cross_attention``: one parameter object per pair, two names in the state dict.
    """
    cfg = bert.config
    if (cfg.num_hidden_layers - cfg.fusion_layer) % 2:
        raise ValueError(f"{cfg.num_hidden_layers - cfg.fusion_layer} fusion layers cannot form pairs")
    for first in range(cfg.fusion_layer, cfg.num_hidden_layers, 2):
        shared = bert.encoder.layer[first].crossattention.self
        second = bert.encoder.layer[first + 1].crossattention.self
        second.key, second.value = shared.key, shared.value


def fuse_pair(bert: BertModel, text_embeds: Tensor, attention_mask: Tensor, image0: Tensor, image1: Tensor,
              cls_only: bool = True) -> Tensor:
    """Paired fusion layers on text states (B, T, H) with image tokens image0, image1 (B, S, W) -> (B, T, H).

    Layer ``l`` cross-attends to image ``(l - fusion_layer) % 2`` (all image tokens kept, as the official
    all-ones image mask); ``cls_only``: the last layer computes the [CLS] row alone -> (B, 1, H), same values.
    """
    cfg = bert.config
    mask = extended_mask(attention_mask, text_embeds.dtype)
    hidden = text_embeds
    for n in range(cfg.fusion_layer, cfg.num_hidden_layers):
        image = image1 if (n - cfg.fusion_layer) % 2 else image0
        rows = CLS if cls_only and n == cfg.num_hidden_layers - 1 else None
        hidden = bert.encoder(hidden, mask, n, n + 1, image, last_rows=rows)
    return hidden


class ALBEFNLVR(ALBEFClassifier):
    """NLVR2 classifier (False 0 / True 1); keys and shapes those of the released NLVR2 checkpoints.

    ``config`` is the ordinary (12-layer) ALBEF config; the text encoder is built with the fusion layers
    doubled (:func:`paired_bert_config`), its twin too.
    """

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__(dataclasses.replace(config, bert=paired_bert_config(config.bert)), num_classes=2)
        share_cross_attention(self.text_encoder)
        if config.distill:  # the twin was copied before sharing: share its projections the same way
            share_cross_attention(self.text_encoder_m)

    def fused_cls(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        """image (2B, 3, R, R): the B first images, then the B second images; text (B, T) -> fused [CLS] (B, H)."""
        vit, bert = (self.visual_encoder_m, self.bert_m) if momentum else (self.visual_encoder, self.bert)
        image0, image1 = vit(image).split(input_ids.size(0))  # (B, 1+N, D) each
        text_embeds = bert.encode_text(input_ids, attention_mask)  # (B, T, H)
        return fuse_pair(bert, text_embeds, attention_mask, image0, image1)[:, 0]
