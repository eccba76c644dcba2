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
import torch.nn.functional as F
from torch import Tensor

from models.bert import MASK_VALUE, BertConfig, BertForMaskedLM, BertSelfAttention, ImageKV, extended_mask

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
        position sees only itself), reused by :meth:`decode_candidates`.
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

    def decode_candidates(
        self, input_ids: Tensor, decode: Tensor, prefix: PrefixKV, question_kv: ImageKV, question_atts: Tensor,
    ) -> Tensor:
        """Hidden states (M, H) of the M answer positions ``decode`` (N, L) of k candidates per question.

        input_ids (N, L): the candidates' tokens after the BOS (positions 1..L), question by question (rows
        q*k .. q*k+k-1 belong to question q); decode (N, L) bool: the positions to compute, a prefix of each row
        (those that predict a token: not the final ``[SEP]``, not padding); prefix: from :meth:`start`.

        Equals those positions of a full causal decode of ``[BOS] + input_ids`` (the BOS position, the same for
        every candidate of a question, comes from ``prefix``). Every projection and feed-forward runs on the M
        decoded tokens only, packed; only the attention products see the (N, L) grid.
        """
        n, length = input_ids.shape
        q = question_atts.size(0)
        k = n // q
        x = self.bert.embeddings(input_ids, start=1)[decode]  # (M, H), positions 1..L
        # Query i (position i+1) sees keys 0..i+1: the BOS and the decoded tokens up to itself.
        upper = torch.ones(length, length + 1, dtype=torch.bool, device=x.device).triu(2)
        keys_valid = torch.cat([decode.new_ones(n, 1), decode], dim=1)  # (N, L+1)
        allowed = ~upper[None] & keys_valid[:, None, :]  # (N, L, L+1)
        self_mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, MASK_VALUE)
        self_mask = self_mask[:, None]  # (N, 1, L, L+1)
        cross_mask = extended_mask(question_atts, x.dtype)  # (Q, 1, 1, S)

        def grid(rows: Tensor) -> Tensor:  # (M, H) -> (N, L, H), zeros where not decoded
            return rows.new_zeros(n, length, rows.size(-1)).masked_scatter(decode[..., None], rows)

        for layer, (pk, pv), (ck, cv) in zip(self.bert.encoder.layer, prefix, question_kv):
            attn = layer.attention.self
            keys = torch.cat([pk.repeat_interleave(k, dim=0), grid(attn.key(x))], dim=1)  # (N, L+1, H)
            values = torch.cat([pv.repeat_interleave(k, dim=0), grid(attn.value(x))], dim=1)
            out = _attend(attn, grid(attn.query(x)), keys, values, self_mask)[decode]  # (M, H)
            x = layer.attention.output(out, x)
            cross = layer.crossattention.self
            # the k candidates of a question form one row of k*L queries against its S keys
            queries = grid(cross.query(x)).view(q, k * length, -1)
            out = _attend(cross, queries, ck, cv, cross_mask).view(n, length, -1)[decode]
            x = layer.crossattention.output(out, x)
            x = layer.output(layer.intermediate(x), x)
        return x


def _attend(attn: BertSelfAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention of projected queries (B, T, H) on keys, values (B, S, H) -> (B, T, H)."""
    p = attn.dropout_p if attn.training else 0.0
    out = F.scaled_dot_product_attention(attn._heads(q), attn._heads(k), attn._heads(v), attn_mask=mask, dropout_p=p)
    return out.transpose(1, 2).reshape(q.shape)
