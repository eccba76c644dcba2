"""ALBEF visual question answering (paper Sec. 5 and Fig. 3a; official ``models/model_vqa.py``).

The image encoder and the 12-layer BERT fuse the image with the question; a 6-layer answer decoder
(:class:`models.decoder.AnswerDecoder`) generates the answer while cross-attending to the fused question
states. Training maximises the likelihood of the annotators' answers, each weighted by its share of the
annotations, with momentum distillation; inference ranks a fixed answer list (:mod:`models.vqa_rank`).

Parameter names and shapes are those of the released ``vqa.pth``: ``visual_encoder``, ``text_encoder``
(a bare BERT, no MLM head), ``text_decoder.bert`` / ``text_decoder.cls``, and the momentum twins
``visual_encoder_m``, ``text_encoder_m``, ``text_decoder_m`` when ``distill`` is on.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertModel
from models.decoder import AnswerDecoder, decoder_config
from models.vqa_rank import rank_answers

# Parts of a pre-training or retrieval checkpoint that the VQA model has no place for.
UNUSED_CHECKPOINT_KEYS = re.compile(r"^(vision_proj|text_proj|itm_head|temp|image_queue|text_queue|idx_queue|"
                                    r"queue_ptr)(_m)?(\.|$)")


def answer_loss(
    logits: Tensor, targets: Tensor, row_answer: Tensor, weights: Tensor, num_images: int,
    soft_labels: Tensor | None = None, alpha: float = 0.0,
) -> Tensor:
    """Weighted answer likelihood loss of the official VQA model (``BertLMHeadModel`` with ``reduction='none'``).

    logits (M, V) at the M answer positions that predict a token (targets (M,): the next token, ``[SEP]``
    included), row_answer (M,) the answer of each row, weights (N,) of the N answers, soft_labels (M, V) the
    momentum decoder's softmax at the same rows. Returns
    ``sum_n w_n * sum_t [(1 - alpha) * CE_nt + alpha * (-sum_v soft_ntv * log_softmax_ntv)] / num_images``.
    """
    per_row = F.cross_entropy(logits, targets, reduction="none")  # (M,)
    if soft_labels is not None:
        distill = -(soft_labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
        per_row = (1.0 - alpha) * per_row + alpha * distill
    return (weights.index_select(0, row_answer).to(per_row.dtype) * per_row).sum() / num_images


class ALBEFVQA(ALBEFBase):
    """VQA model; ``forward`` returns ``{'loss'}``, :meth:`rank` the ranked answer-list indices."""

    text_encoder: BertModel
    unused_checkpoint_keys = UNUSED_CHECKPOINT_KEYS

    def __init__(self, config: ALBEFConfig, decoder_layers: int | None = None, pad_token_id: int = 0) -> None:
        """decoder_layers: the answer decoder's depth, by default the encoder's fusion-layer count (6)."""
        super().__init__(config, mlm_head=False, momentum=False, queue=False)
        for name in ("vision_proj", "text_proj", "itm_head", "temp"):  # no contrastive or ITM head here
            delattr(self, name)
        self.text_decoder = AnswerDecoder(decoder_config(config.bert, decoder_layers))
        self.pad_token_id = pad_token_id
        if config.distill:  # official: the twins exist only with distillation
            for name in ("visual_encoder", "text_encoder", "text_decoder"):
                self.add_momentum_twin(name)

    def encode_question(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                        momentum: bool = False) -> Tensor:
        """Image (B, 3, R, R) and question (B, T) -> fused question states (B, T, H) (all 12 BERT layers)."""
        if momentum:
            return self.text_encoder_m(input_ids, attention_mask, self.visual_encoder_m(image))
        return self.text_encoder(input_ids, attention_mask, self.visual_encoder(image))

    def forward(
        self, image: Tensor, question_ids: Tensor, question_atts: Tensor, answer_ids: Tensor, answer_atts: Tensor,
        answers_per_question: Tensor, weights: Tensor, alpha: float = 0.0,
    ) -> dict[str, Tensor]:
        """Training loss.

        image (B, 3, R, R); question_ids, question_atts (B, Tq); answer_ids, answer_atts (N, Ta) as
        ``[CLS] answer [SEP] [PAD]..``, the answers of question 0 first, then question 1, ...;
        answers_per_question (B,) long, summing to N; weights (N,). ``alpha``: distillation weight (used only
        with ``distill``).
        """
        b = image.size(0)
        answer_question = torch.repeat_interleave(torch.arange(b, device=image.device), answers_per_question)
        targets = answer_ids[:, 1:]  # (N, Ta-1): position t predicts token t+1; [CLS] is never a target
        valid = targets != self.pad_token_id  # padding ignored (official: labels -100 at [PAD])
        row_answer = torch.arange(answer_ids.size(0), device=image.device)[:, None].expand_as(valid)[valid]  # (M,)

        states = self.encode_question(image, question_ids, question_atts)  # (B, Tq, H)
        logits = self._answer_logits(self.text_decoder, states, question_atts, answer_ids, answer_atts,
                                     answer_question, valid)
        soft = None
        if self.config.distill:
            with torch.no_grad():
                self.momentum_update()
                if alpha > 0:  # alpha 0 (start of the warm-up) leaves the teacher's term out exactly
                    states_m = self.encode_question(image, question_ids, question_atts, momentum=True)
                    soft = self._answer_logits(self.text_decoder_m, states_m, question_atts, answer_ids, answer_atts,
                                               answer_question, valid).softmax(dim=-1)
        return {"loss": answer_loss(logits, targets[valid], row_answer, weights, b, soft, alpha)}

    @staticmethod
    def _answer_logits(
        decoder: AnswerDecoder, states: Tensor, question_atts: Tensor, answer_ids: Tensor, answer_atts: Tensor,
        answer_question: Tensor, valid: Tensor,
    ) -> Tensor:
        """Decoder vocabulary logits (M, V) at the positions ``valid`` (N, Ta-1) that predict a token."""
        question_kv = decoder.question_keys_values(states)  # once per question, gathered per answer
        hidden = decoder(answer_ids, answer_atts, question_kv, question_atts, answer_question)  # (N, Ta, H)
        return decoder.cls(hidden[:, :-1][valid])

    @torch.no_grad()
    def rank(
        self, image: Tensor, question_ids: Tensor, question_atts: Tensor, answer_ids: Tensor, answer_atts: Tensor,
        k: int,
    ) -> tuple[Tensor, Tensor]:
        """Rank the tokenised answer list (A, Ta) for B questions: indices (B, k) and probabilities (B, k)."""
        states = self.encode_question(image, question_ids, question_atts)
        return rank_answers(self.text_decoder, states, question_atts, answer_ids, answer_atts, k, self.pad_token_id)
