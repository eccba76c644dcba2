"""ALBEF pre-training model: ITC + ITM + MLM with momentum distillation (paper Sec. 3.2-3.3).

``ALBEFPretrain.forward`` returns ``{'loss_ita', 'loss_itm', 'loss_mlm'}`` and reads top to bottom as
the paper: unimodal encoding -> contrastive alignment -> multimodal matching -> masked LM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine import distributed
from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertForMaskedLM, ImageKV
from models.losses import itc_loss, mask_tokens, mlm_loss, soft_targets


class ALBEFPretrain(ALBEFBase):
    """Pre-training model; parameter names are those of the released ``ALBEF.pth``."""

    text_encoder: BertForMaskedLM

    def __init__(self, config: ALBEFConfig, pad_token_id: int = 0, cls_token_id: int = 101,
                 mask_token_id: int = 103) -> None:
        super().__init__(config, mlm_head=True, momentum=True, queue=True)
        self.special_ids = (pad_token_id, cls_token_id)
        self.mask_token_id = mask_token_id

    def forward(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float = 0.0,
        itc_warmup: bool = False,
    ) -> dict[str, Tensor]:
        """image (B, 3, R, R); input_ids, attention_mask (B, T) as ``[CLS] w1 .. wn [PAD]..``.

        ``itc_warmup``: ITC alone, against the in-batch momentum features only (the queue is still
        filled); ITM and MLM are skipped, so only ``loss_ita`` is returned, at about half the cost of a
        full step. A model trained from scratch needs this to leave its initial plateau (see
        ``itc_warmup_steps``).
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.encode_image(image)  # (B, 1+N, D), (B, E)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)  # (B, T, H), (B, E)
        image_embeds_m, image_feat_m, text_feat_m = self.momentum_features(image, input_ids, attention_mask)

        loss_ita, sim_i2t, sim_t2i = self.contrastive(image_feat, text_feat, image_feat_m, text_feat_m, alpha,
                                                      use_queue=not itc_warmup)
        self.enqueue(image_feat_m, text_feat_m)  # after the loss: this batch is a negative for the next one
        if itc_warmup:
            return {"loss_ita": loss_ita + self._ddp_anchor()}

        bs = image.size(0)
        positive = torch.eye(bs, dtype=torch.bool, device=image.device)
        image_kv = self.bert.image_keys_values(image_embeds)  # projected once for ITM and MLM
        loss_itm = self.itm_with_hard_negatives(image_embeds, text_embeds, attention_mask,
                                                sim_i2t[:, :bs], sim_t2i[:, :bs], positive, image_kv)
        loss_mlm = self.masked_lm(input_ids, attention_mask, image_embeds, image_embeds_m, alpha, image_kv)
        return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm}

    def _ddp_anchor(self) -> Tensor | float:
        """0 that depends on every trainable parameter when distributed, 0.0 otherwise.

        DistributedDataParallel expects a gradient for every parameter in every step; the fusion layers and
        heads that an ITC-only step leaves out get an exact zero through this term.
        """
        if not distributed.is_dist_initialized():
            return 0.0
        return 0.0 * sum(p.reshape(-1)[:1].sum() for p in self.parameters() if p.requires_grad)

    def contrastive(
        self, image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor, alpha: float,
        use_queue: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ITC against [momentum batch features, queue] with MoD soft targets (eqs. 1-2, 6).

        Returns the loss and the online similarities sim_i2t, sim_t2i (B, B + Q), or (B, B) without the queue.
        """
        with torch.no_grad():
            # torch.cat copies the queues, so the in-place enqueue after the loss cannot alter them
            image_queue, text_queue = self.image_queue, self.text_queue  # (E, Q)
            if not use_queue:
                image_queue, text_queue = image_queue[:, :0], text_queue[:, :0]  # (E, 0)
            image_feat_all = torch.cat([image_feat_m.t(), image_queue], dim=1)  # (E, B + Q)
            text_feat_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            hard = torch.zeros_like(sim_i2t_m)
            hard.fill_diagonal_(1.0)
            targets_i2t = soft_targets(sim_i2t_m, hard, alpha)
            targets_t2i = soft_targets(sim_t2i_m, hard, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        return itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i), sim_i2t, sim_t2i

    def masked_lm(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, image_embeds_m: Tensor,
        alpha: float, image_kv: ImageKV | None = None,
    ) -> Tensor:
        """MLM conditioned on the image, distilled from the momentum model (eq. 7).

        The vocabulary head runs only at the masked positions, for the student and the teacher.
        """
        masked_ids, labels = mask_tokens(input_ids, self.config.bert.vocab_size, self.mask_token_id,
                                         self.special_ids, self.config.mlm_probability)
        positions = labels != -100  # (B, T)
        soft = None
        if alpha > 0:
            with torch.no_grad():
                hidden_m = self.text_encoder_m.bert(masked_ids, attention_mask, image_embeds_m)
                soft = self.text_encoder_m.logits_at(hidden_m, positions).softmax(dim=-1)  # (M, V)
        hidden = self.text_encoder.bert(masked_ids, attention_mask, image_embeds, image_kv=image_kv)  # (B, T, H)
        logits = self.text_encoder.logits_at(hidden, positions)  # (M, V)
        return mlm_loss(logits, labels[positions], soft, alpha)
