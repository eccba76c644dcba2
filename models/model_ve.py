"""ALBEF classification on the fused [CLS] state; SNLI-VE (paper Sec. 5, official ``model_ve.py``).

:class:`ALBEFClassifier` is the part SNLI-VE and NLVR2 share: the image encoder, a bare BERT (no MLM head,
``text_encoder.*``), an MLP ``cls_head`` (hidden -> hidden -> classes, ReLU) on the fused [CLS] state and,
with ``distill``, momentum twins of all three (``*_m``) whose class distribution is the distillation target
(paper Sec. 3.3). ``forward`` returns ``{'loss', 'acc'}``; :meth:`ALBEFClassifier.logits` is the evaluation path.
:class:`ALBEFVE` fuses one image (12 layers); ``models.model_nlvr.ALBEFNLVR`` fuses two.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertModel
from models.losses import distill_cross_entropy

VE_CLASSES = 3  # contradiction 0, neutral 1, entailment 2 (official ve_dataset mapping)


def mlp_head(width: int, num_classes: int) -> nn.Sequential:
    """``cls_head``: Linear(width, width) -> ReLU -> Linear(width, classes) (keys ``cls_head.0/2.*``)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class ALBEFClassifier(ALBEFBase):
    """ViT + bare BERT + ``cls_head`` (+ ``*_m`` twins when ``config.distill``), as the released classifiers.

    The contrastive projections, ``temp`` and ``itm_head`` of :class:`ALBEFBase` are not part of these models
    (nor of their released checkpoints); a pre-training checkpoint's copies of them are dropped on loading
    (``unused_checkpoint_keys``). Subclasses define :meth:`fused_cls`.
    """

    text_encoder: BertModel

    def __init__(self, config: ALBEFConfig, num_classes: int) -> None:
        super().__init__(config, mlm_head=False, momentum=False, queue=False)
        # Entries of pre-training / retrieval checkpoints that this model does not use (dropped by load_weights).
        unused = r"^(vision_proj|text_proj|itm_head|ta_head)(_m)?\.|^temp$"
        self.unused_checkpoint_keys = re.compile(unused if config.distill else unused + r"|^[a-z_]+_m\.")
        self.task_head_keys = re.compile(r"^cls_head\.")  # new when fine-tuning from pre-training
        for name in ("vision_proj", "text_proj", "temp", "itm_head"):
            delattr(self, name)
        self.cls_head = mlp_head(config.bert.hidden_size, num_classes)
        if config.distill:  # official: the twins exist only with distill
            for name in ("visual_encoder", "text_encoder", "cls_head"):
                self.add_momentum_twin(name)

    def fused_cls(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        """The fused [CLS] state (B, H) of each text with its image(s)."""
        raise NotImplementedError

    def logits(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        """Class logits (B, C) of the online model (or of the momentum twins)."""
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(image, input_ids, attention_mask, momentum))

    def forward(
        self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """Training step: ``{'loss': (1 - alpha) CE + alpha soft CE vs the twins, 'acc': batch accuracy}``.

        With ``distill`` the twins take their EMA step first, then give the soft targets (official order of
        effects: the online forward does not depend on the twins).
        """
        logits = self.logits(image, input_ids, attention_mask)  # (B, C)
        logits_m = None
        if self.config.distill:
            with torch.no_grad():
                self.momentum_update()
                logits_m = self.logits(image, input_ids, attention_mask, momentum=True)
        loss = distill_cross_entropy(logits, targets, logits_m, alpha)
        acc = (logits.detach().argmax(dim=1) == targets).float().mean()
        return {"loss": loss, "acc": acc}


class ALBEFVE(ALBEFClassifier):
    """SNLI-VE: 3-way classification (contradiction 0, neutral 1, entailment 2) of (image, hypothesis)."""

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__(config, num_classes=VE_CLASSES)

    def fused_cls(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, momentum: bool = False) -> Tensor:
        """image (B, 3, R, R), input_ids / attention_mask (B, T) -> fused [CLS] (B, H) (all 12 layers)."""
        vit, bert = (self.visual_encoder_m, self.bert_m) if momentum else (self.visual_encoder, self.bert)
        image_embeds = vit(image)  # (B, 1+N, D)
        text_embeds = bert.encode_text(input_ids, attention_mask)  # (B, T, H)
        return bert.fuse(text_embeds, attention_mask, image_embeds, cls_only=True)[:, 0]
