"""BERT text encoder and fusion encoder of ALBEF (Li et al., NeurIPS 2021, Sec. 3.1).

A 12-layer BERT-base is split at ``fusion_layer``: layers ``[0, fusion_layer)`` form the text encoder,
layers ``[fusion_layer, num_layers)`` the multimodal (fusion) encoder, where every layer runs
self-attention -> cross-attention to the image tokens -> feed-forward.

Module and parameter names follow the released ALBEF checkpoints (``bert.encoder.layer.7.crossattention.
self.query.weight``, ``cls.predictions.transform.dense.weight`` ...), so their state dicts load unchanged.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

# Keys that Hugging Face writes into config.json and that carry no architecture information here.
_HF_METADATA_KEYS = {
    "architectures", "model_type", "transformers_version", "gradient_checkpointing", "use_cache",
    "position_embedding_type", "classifier_dropout", "torch_dtype", "dtype", "add_cross_attention",
}
# Additive mask value for padded text keys, as in the official implementation.
MASK_VALUE = -10000.0
ImageKV = list[tuple[Tensor, Tensor]]  # per fusion layer: cross-attention keys, values (B, S, H)
CLS = slice(0, 1)  # the [CLS] row, the only one that features and the ITM head read


@dataclass
class BertConfig:
    """Architecture of the BERT part. ``fusion_layer`` splits text and fusion layers."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    fusion_layer: int = 6
    encoder_width: int = 768

    @classmethod
    def from_json(cls, path: str, **overrides: object) -> BertConfig:
        """Read a BERT config.json (official ``config_bert.json`` format); unknown keys are an error."""
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read BERT config {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - _HF_METADATA_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown BERT config key(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in raw.items() if k in known}
        values.update(overrides)
        config = cls(**values)
        if config.hidden_act != "gelu":
            raise ValueError(f"{path}: hidden_act {config.hidden_act!r} is not supported (only 'gelu')")
        return config


def extended_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 key mask -> (B, 1, 1, T) additive mask with 0 for kept and -10000 for padded keys."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent, as in the released checkpoints (they hold `embeddings.position_ids`).
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """(B, T) token ids -> (B, T, H); token type 0 everywhere; positions ``start .. start+T-1``
        (``start > 0``: tokens that continue a prefix decoded earlier, as the VQA answer decoder's)."""
        seq_len = input_ids.size(1)
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(self.position_ids[:, start:start + seq_len])
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross: bool) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
        self.num_heads = config.num_attention_heads
        kv_width = config.encoder_width if is_cross else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.save_attention = False  # set by Grad-CAM: keeps the attention map and its gradient
        self.attention_map: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape  # (B, T, H) -> (B, nh, T, hs)
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden: Tensor, mask: Tensor | None, kv: Tensor | None = None, is_causal: bool = False,
                keys_values: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """hidden (B, T, H); kv (B, S, W) for cross-attention; mask additive (B, 1, 1|T, S) or None.

        ``keys_values``: ``(self.key(kv), self.value(kv))`` (B, S, H) already computed, for callers that
        reuse one image's keys and values across many texts (retrieval reranking); ``kv`` is then unused.
        """
        if keys_values is None:
            kv = hidden if kv is None else kv
            keys_values = self.key(kv), self.value(kv)
        q, k, v = self._heads(self.query(hidden)), self._heads(keys_values[0]), self._heads(keys_values[1])
        if self.save_attention:
            out = self._explicit_attention(q, k, v, mask)
        else:
            if is_causal:  # combine the causal structure with the padding mask in one additive mask
                mask = _causal_mask(q.size(2), q.dtype, q.device) + (0 if mask is None else mask)
            p = self.dropout_p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, T, H)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Same math with the probabilities kept (B, nh, T, S), for Grad-CAM."""
        scores = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5
        probs = (scores if mask is None else scores + mask).softmax(dim=-1)
        if probs.requires_grad:
            probs.retain_grad()
        self.attention_map = probs
        return F.dropout(probs, self.dropout_p, self.training) @ v


def _causal_mask(t: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    upper = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(t, t, dtype=dtype, device=device).masked_fill(upper, MASK_VALUE)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual LayerNorm (``attention.output`` / ``crossattention.output``)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross: bool = False) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, is_cross)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: Tensor, mask: Tensor | None, kv: Tensor | None = None, is_causal: bool = False,
                keys_values: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.output(self.self(hidden, mask, kv, is_causal, keys_values), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention to image tokens, in fusion layers) -> feed-forward."""

    def __init__(self, config: BertConfig, layer_num: int) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, hidden: Tensor, mask: Tensor | None, image: Tensor | None = None,
        image_mask: Tensor | None = None, is_causal: bool = False,
        image_kv: tuple[Tensor, Tensor] | None = None, rows: slice | None = None,
    ) -> Tensor:
        """``image_kv``: this layer's cross-attention keys and values of ``image``, when already computed.

        ``rows``: compute the output (B, T', H) of these text positions only; their self-attention keys
        and values still come from every position, so each row equals the full layer's.
        """
        if rows is None:
            hidden = self.attention(hidden, mask, is_causal=is_causal)
        elif is_causal:
            raise ValueError("rows cannot be combined with causal self-attention")
        else:
            hidden = self.attention(hidden[:, rows], mask, hidden)  # queries `rows`, keys every token
        return self.after_self_attention(hidden, image, image_mask, image_kv)

    def after_self_attention(
        self, hidden: Tensor, image: Tensor | None = None, image_mask: Tensor | None = None,
        image_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The rest of the layer on self-attended states (B, T, H): cross-attention (fusion layers), feed-forward."""
        if self.has_cross_attention:
            if image is None and image_kv is None:
                raise ValueError("a fusion layer needs the image (encoder) hidden states")
            hidden = self.crossattention(hidden, image_mask, image, keys_values=image_kv)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.grad_ckpt = False

    def forward(
        self, hidden: Tensor, mask: Tensor | None, start: int, end: int, image: Tensor | None = None,
        image_mask: Tensor | None = None, is_causal: bool = False, image_kv: ImageKV | None = None,
        last_rows: slice | None = None,
    ) -> Tensor:
        """Run layers [start, end) on hidden (B, T, H); image (B, S, W) for fusion layers, or ``image_kv``:
        their cross-attention keys and values, one (B, S, H) pair per fusion layer run, in order.
        ``last_rows``: the positions the caller reads; the last layer computes only those (B, T', H)."""
        kvs = iter(image_kv or ())
        for n in range(start, end):
            layer = self.layer[n]
            kv = next(kvs) if image_kv is not None and layer.has_cross_attention else None
            rows = last_rows if n == end - 1 else None
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, mask, image, image_mask, is_causal, kv, rows, use_reentrant=False)
            else:
                hidden = layer(hidden, mask, image, image_mask, is_causal, kv, rows)
        return hidden


class BertModel(nn.Module):
    """BERT without pooler, with named entry points for the text and the fusion halves."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, cls_only: bool = False) -> Tensor:
        """Text-only layers: (B, T) ids -> (B, T, H) (official ``mode='text'``); (B, 1, H) with ``cls_only``:
        the last layer then computes the [CLS] row alone, the same values."""
        hidden = self.embeddings(input_ids)
        mask = extended_mask(attention_mask, hidden.dtype)
        return self.encoder(hidden, mask, 0, self.config.fusion_layer, last_rows=CLS if cls_only else None)

    @property
    def fusion_layers(self) -> nn.ModuleList:
        """The layers from ``fusion_layer`` on: self-attention, cross-attention to the image, feed-forward."""
        return self.encoder.layer[self.config.fusion_layer:]

    def image_keys_values(self, image_embeds: Tensor) -> ImageKV:
        """Cross-attention keys and values of every fusion layer for image tokens (B, S, W): [((B, S, H), ...)].

        Passed as ``image_kv`` to :meth:`fuse` or :meth:`forward`, with rows gathered per pair, they spare
        projecting the same image again for each text it is paired with (ITM negatives, MLM, reranking).
        """
        return [(layer.crossattention.self.key(image_embeds), layer.crossattention.self.value(image_embeds))
                for layer in self.fusion_layers]

    def fuse(
        self, text_embeds: Tensor, attention_mask: Tensor, image_embeds: Tensor | None,
        image_atts: Tensor | None = None, image_kv: ImageKV | None = None, cls_only: bool = False,
    ) -> Tensor:
        """Fusion layers on text states (B, T, H) and image tokens (B, S, W) -> (B, T, H) (``mode='fusion'``);
        (B, 1, H) with ``cls_only``: the last layer computes the [CLS] row alone, the same values."""
        mask = extended_mask(attention_mask, text_embeds.dtype)
        image_mask = None if image_atts is None else extended_mask(image_atts, text_embeds.dtype)
        cfg = self.config
        return self.encoder(text_embeds, mask, cfg.fusion_layer, cfg.num_hidden_layers, image_embeds, image_mask,
                            image_kv=image_kv, last_rows=CLS if cls_only else None)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor | None = None,
        image_atts: Tensor | None = None, is_causal: bool = False, image_kv: ImageKV | None = None,
    ) -> Tensor:
        """All layers (official ``mode='multi_modal'``): (B, T) ids -> (B, T, H)."""
        hidden = self.embeddings(input_ids)
        mask = extended_mask(attention_mask, hidden.dtype)
        image_mask = None if image_atts is None else extended_mask(image_atts, hidden.dtype)
        return self.encoder(hidden, mask, 0, self.config.num_hidden_layers, image_embeds, image_mask, is_causal,
                            image_kv)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Transform + vocabulary decoder; ``decoder.bias`` and ``bias`` are one tensor, as in BERT."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        nn.init.zeros_(self.decoder.bias)
        self.bias = self.decoder.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """``bert`` + tied ``cls`` head. Key names match ``text_encoder.bert.*`` / ``text_encoder.cls.*``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.transform.apply(self.bert._init_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def logits_at(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """Vocabulary logits only where ``positions`` (B, T) is True -> (M, V), M = positions.sum()."""
        return self.cls(hidden[positions])
