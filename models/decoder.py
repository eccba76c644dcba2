"""The answer decoder of ALBEF's VQA model (paper Sec. 5 and Fig. 3a; official ``BertLMHeadModel``).

A BERT of ``num_hidden_layers`` layers (6 in the released model) with ``fusion_layer = 0``: every layer runs
causal self-attention over the answer tokens -> cross-attention to the fused question states (under the
question's padding mask) -> feed-forward; then the MLM head, whose vocabulary projection is tied to the
word embeddings. Keys: ``text_decoder.bert.*`` and ``text_decoder.cls.*``, as ``vqa.pth``.

The cross-attention keys and values of a question's states are computed once per question
(:meth:`AnswerDecoder.question_keys_values`) and then shared by all the answers of that question: in
training by gathering them per answer, in ranking by letting the ``k`` candidates of a question attend to
them as one batch row (the cross-attention of a query row does not depend on the other rows).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from models.bert import MASK_VALUE, BertConfig, BertForMaskedLM, ImageKV, extended_mask

PrefixKV = list[tuple[Tensor, Tensor]]  # per layer: self-attention key, value of the [CLS] position (Q, 1, H)


def decoder_config(encoder: BertConfig, num_layers: int | None = None) -> BertConfig:
    """The decoder's BERT config: the encoder's, with ``fusion_layer = 0`` and ``num_layers`` layers.

    ``num_layers`` defaults to the encoder's fusion-layer count (12 - 6 = 6, the official value), so a
    pre-trained encoder's fusion layers can initialise it one to one. The cross-attention reads the question
    states, so its key/value width is the text width.
    """
    layers = num_layers if num_layers is not None else encoder.num_hidden_layers - encoder.fusion_layer
    if layers < 1:
        raise ValueError(f"the answer decoder needs at least one layer, got {layers}")
    return dataclasses.replace(encoder, fusion_layer=0, num_hidden_layers=layers, encoder_width=encoder.hidden_size)


class AnswerDecoder(BertForMaskedLM):
    """Causal BERT decoder with cross-attention to question states and the tied LM head (``text_decoder``)."""

    def question_keys_values(self, question_states: Tensor) -> ImageKV:
        """Cross-attention keys and values of every layer for question states (Q, S, H): [((Q, S, H), ...)]."""
        return self.bert.image_keys_values(question_states)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, question_kv: ImageKV, question_atts: Tensor,
        answer_question: Tensor,
    ) -> Tensor:
        """Hidden states (N, T, H) of N answers (N, T), answer ``n`` attending to question ``answer_question[n]``.

        question_kv: :meth:`question_keys_values` of the Q questions; question_atts (Q, S) their 1/0 masks;
        answer_question (N,) long. Same math as the official decoder on the question states repeated per
        answer, without projecting them once per answer.
        """
        hidden = self.bert.embeddings(input_ids)
        self_mask = extended_mask(attention_mask, hidden.dtype)  # (N, 1, 1, T), causal structure added below
        cross_mask = extended_mask(question_atts, hidden.dtype).index_select(0, answer_question)  # (N, 1, 1, S)
        for layer, (k, v) in zip(self.bert.encoder.layer, question_kv):
            kv = (k.index_select(0, answer_question), v.index_select(0, answer_question))  # (N, S, H)
            hidden = layer.attention(hidden, self_mask, is_causal=True)
            hidden = layer.after_self_attention(hidden, image_mask=cross_mask, image_kv=kv)
        return hidden

    def start(self, bos_id: int, question_kv: ImageKV, question_atts: Tensor) -> tuple[Tensor, PrefixKV]:
        """Decode the BOS token alone for each of Q questions.

        Returns its vocabulary logits (Q, V) and, per layer, the self-attention key and value of that
        position (Q, 1, H): the prefix every answer of the question shares (causal attention: the BOS
        position sees only itself), reused by :meth:`continue_after_start`.
        """
        q = question_atts.size(0)
        ids = torch.full((q, 1), bos_id, dtype=torch.long, device=question_atts.device)
        hidden = self.bert.embeddings(ids)  # (Q, 1, H)
        cross_mask = extended_mask(question_atts, hidden.dtype)  # (Q, 1, 1, S)
        prefix: PrefixKV = []
        for layer, kv in zip(self.bert.encoder.layer, question_kv):
            attn = layer.attention.self
            keys_values = attn.key(hidden), attn.value(hidden)
            prefix.append(keys_values)
            hidden = layer.attention(hidden, None, keys_values=keys_values)
            hidden = layer.after_self_attention(hidden, image_mask=cross_mask, image_kv=kv)
        return self.cls(hidden[:, 0]), prefix

    def continue_after_start(
        self, input_ids: Tensor, attention_mask: Tensor, prefix: PrefixKV, question_kv: ImageKV,
        question_atts: Tensor,
    ) -> Tensor:
        """Hidden states (Q*k, L, H) of answer positions 1..L of k candidates per question, after the BOS.

        input_ids, attention_mask (Q*k, L): the candidates' tokens without their leading BOS, question by
        question (rows q*k .. q*k+k-1 belong to question q); prefix: from :meth:`start`. Equals positions
        1..L of a full causal decode of ``[BOS] + input_ids`` (the BOS row is the same for every candidate).
        """
        n, length = input_ids.shape
        q = question_atts.size(0)
        k = n // q
        hidden = self.bert.embeddings(input_ids, start=1)  # (N, L, H), positions 1..L
        # Query i (position i+1) sees keys 0..i+1: the BOS and the answer tokens up to itself, not padding.
        upper = torch.ones(length, length + 1, dtype=torch.bool, device=input_ids.device).triu(2)
        keys_valid = torch.cat([attention_mask.new_ones(n, 1), attention_mask], dim=1).bool()  # (N, L+1)
        allowed = ~upper[None] & keys_valid[:, None, :]  # (N, L, L+1)
        self_mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        self_mask = self_mask.masked_fill(~allowed, MASK_VALUE)[:, None]  # (N, 1, L, L+1)
        cross_mask = extended_mask(question_atts, hidden.dtype)  # (Q, 1, 1, S)
        for layer, (pk, pv), kv in zip(self.bert.encoder.layer, prefix, question_kv):
            attn = layer.attention.self
            keys = torch.cat([pk.repeat_interleave(k, dim=0), attn.key(hidden)], dim=1)  # (N, L+1, H)
            values = torch.cat([pv.repeat_interleave(k, dim=0), attn.value(hidden)], dim=1)
            hidden = layer.attention(hidden, self_mask, keys_values=(keys, values))
            # the k candidates of a question form one row of k*L queries against its S keys
            hidden = layer.after_self_attention(hidden.reshape(q, k * length, -1), image_mask=cross_mask,
                                                image_kv=kv).reshape(n, length, -1)
        return hidden
