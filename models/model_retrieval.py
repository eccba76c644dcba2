"""ALBEF image-text retrieval fine-tuning model (paper Sec. 4, official ``model_retrieval.py``).

The objective is pre-training's ITC + ITM without MLM, made image-id aware: every batch or queue entry
whose caption belongs to the same image is a positive of the contrastive loss (ground truth
1/#positives, an ``idx_queue`` beside the feature queues), and same-image pairs are never drawn as
ITM hard negatives. ``forward`` returns ``{'loss_ita', 'loss_itm'}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertModel
from models.losses import itc_loss, positive_targets, soft_targets


class ALBEFRetrieval(ALBEFBase):
    """Retrieval model; parameter and buffer names (and order) are those of ``mscoco.pth`` / ``flickr30k.pth``.

    The text encoder is a bare BERT (``text_encoder.*``). Momentum twins are always built: as in the
    official code they produce the queued features even when ``distill`` is False.
    """

    text_encoder: BertModel

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__(config, mlm_head=False, momentum=True, queue=True)
        # Official buffer order: image_queue, text_queue, idx_queue, queue_ptr (state-dict key order).
        queue_ptr = self._buffers.pop("queue_ptr")
        # -100 never equals an image index, so the initial (random) queue entries are all negatives.
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", queue_ptr)

    def forward(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, idx: Tensor, alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """image (B, 3, R, R); input_ids, attention_mask (B, T); idx (B,) image indices of the captions."""
        image_embeds, image_feat = self.encode_image(image)  # (B, 1+N, D), (B, E)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)  # (B, T, H), (B, E)
        _, image_feat_m, text_feat_m = self.momentum_features(image, input_ids, attention_mask)

        loss_ita, sim_i2t, sim_t2i = self.contrastive(image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha)
        self.enqueue(image_feat_m, text_feat_m, idx)  # after the loss: the batch joins the negatives

        bs = image.size(0)
        same_image = idx[:, None] == idx[None, :]  # (B, B): never sampled as hard negatives
        loss_itm = self.itm_with_hard_negatives(image_embeds, text_embeds, attention_mask,
                                                sim_i2t[:, :bs], sim_t2i[:, :bs], same_image)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}

    def contrastive(
        self, image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor, idx: Tensor,
        alpha: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Id-aware ITC against [momentum batch features, queue], MoD soft targets when ``distill``.

        Features (B, E), idx (B,). Returns the loss and the online similarities sim_i2t, sim_t2i (B, B + Q).
        The temperature is not clamped, as in the official retrieval model.
        """
        with torch.no_grad():
            # torch.cat copies the queues, so the in-place enqueue after the loss cannot alter them
            idx_all = torch.cat([idx[None, :], self.idx_queue], dim=1)  # (1, B + Q)
            targets = positive_targets(idx[:, None] == idx_all)  # (B, B + Q), 1/#positives per positive
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)  # (E, B + Q)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
            targets_i2t = targets_t2i = targets
            if self.config.distill:
                targets_i2t = soft_targets(image_feat_m @ text_feat_all / self.temp, targets, alpha)
                targets_t2i = soft_targets(text_feat_m @ image_feat_all / self.temp, targets, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        return itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i), sim_i2t, sim_t2i
