"""A straightforward re-implementation of the OFFICIAL ALBEF pre-training step (salesforce/ALBEF).

It runs on the same :class:`~models.model_pretrain.ALBEFPretrain` object as the fast step, using that
model's weights, but with the algorithm of the official ``models/model_pretrain.py`` / ``xbert.py`` /
``vit.py``:

* out-of-place EMA of the momentum encoders (``p_m.data = p_m.data * m + p.data * (1 - m)``);
* attention written out (``q @ k^T * scale + mask -> softmax -> dropout -> @ v``) in BERT and the ViT;
* queues concatenated with ``.clone().detach()``, updated by slice assignment after ITC;
* one hard negative per sample drawn in a Python loop with ``torch.multinomial(...).item()``;
* ITM with separate fusion passes for the positives and the negatives;
* MLM with full-vocabulary logits (B, T, V) for the student and the momentum teacher.

It serves as the baseline of ``scripts/benchmark.py`` and as the oracle of ``tests/test_fast_step.py``:
given the random draws of a fast step (``neg_image_idx``, ``neg_text_idx``, ``mlm_mask``) it must give
the same losses and gradients.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine import distributed  # noqa: E402
from models.bert import BertAttention, BertForMaskedLM, BertLayer, BertModel  # noqa: E402
from models.model_pretrain import ALBEFPretrain  # noqa: E402

__all__ = ["reference_forward", "reference_train_step", "official_mask", "vit_forward", "bert_forward"]

MASK_VALUE = -10000.0


# ------------------------------------------------------------------ attention
def manual_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, training: bool) -> Tensor:
    """Explicit scaled dot-product attention; q (B, h, T, d), k, v (B, h, S, d), additive mask."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, dropout_p, training)
    return probs @ v


def extended_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S) 1/0 mask -> (B, 1, 1, S) additive mask, as ``get_extended_attention_mask``."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


# ----------------------------------------------------------------------- ViT
def vit_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """The official ViT ``Attention.forward`` with the weights of a timm ``Attention``."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    probs = attn.attn_drop(scores.softmax(dim=-1))
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj_drop(attn.proj(attn.norm(out)))


def vit_forward(vit: nn.Module, image: Tensor) -> Tensor:
    """Official ``VisionTransformer.forward``: (B, 3, R, R) -> all tokens (B, 1 + N, D) after the norm."""
    x = vit.patch_embed(image)  # (B, N, D)
    cls_tokens = vit.cls_token.expand(x.size(0), -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = vit.pos_drop(x + vit.pos_embed[:, : x.size(1), :])
    for blk in vit.blocks:
        x = x + blk.drop_path1(blk.ls1(vit_attention(blk.attn, blk.norm1(x))))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return vit.norm(x)


# ---------------------------------------------------------------------- BERT
def bert_attention(module: BertAttention, hidden: Tensor, mask: Tensor, kv: Tensor | None = None) -> Tensor:
    """Official ``BertAttention`` (self- or cross-attention + output projection + residual LayerNorm)."""
    attn, out = module.self, module.output
    kv = hidden if kv is None else kv
    b, t, width = hidden.shape

    def heads(x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), attn.num_heads, -1).permute(0, 2, 1, 3)

    q, k, v = heads(attn.query(hidden)), heads(attn.key(kv)), heads(attn.value(kv))
    context = manual_attention(q, k, v, mask, attn.dropout_p, module.training)
    context = context.permute(0, 2, 1, 3).reshape(b, t, width)
    return out.LayerNorm(out.dropout(out.dense(context)) + hidden)


def bert_layer(
    layer: BertLayer, hidden: Tensor, mask: Tensor, image: Tensor | None, image_mask: Tensor | None,
) -> Tensor:
    """Official ``BertLayer``: self-attention, cross-attention in fusion layers, feed-forward."""
    hidden = bert_attention(layer.attention, hidden, mask)
    if layer.has_cross_attention:
        hidden = bert_attention(layer.crossattention, hidden, image_mask, image)
    intermediate = F.gelu(layer.intermediate.dense(hidden))
    out = layer.output
    return out.LayerNorm(out.dropout(out.dense(intermediate)) + hidden)


def bert_embeddings(bert: BertModel, input_ids: Tensor) -> Tensor:
    """Official ``BertEmbeddings``: word + token type (0) + absolute position, LayerNorm, dropout."""
    emb = bert.embeddings
    seq_len = input_ids.size(1)
    token_type = torch.zeros_like(input_ids)
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type)
    x = x + emb.position_embeddings(emb.position_ids[:, :seq_len])
    return emb.dropout(emb.LayerNorm(x))


def bert_forward(
    bert: BertModel, attention_mask: Tensor, mode: str, input_ids: Tensor | None = None,
    embeds: Tensor | None = None, image: Tensor | None = None, image_atts: Tensor | None = None,
) -> Tensor:
    """Official ``BertModel.forward`` in ``mode`` 'text' (ids), 'fusion' (text states) or 'multi_modal'."""
    fusion = bert.config.fusion_layer
    start, end = {"text": (0, fusion), "fusion": (fusion, bert.config.num_hidden_layers),
                  "multi_modal": (0, bert.config.num_hidden_layers)}[mode]
    hidden = embeds if mode == "fusion" else bert_embeddings(bert, input_ids)
    mask = extended_mask(attention_mask, hidden.dtype)
    image_mask = None if image_atts is None else extended_mask(image_atts, hidden.dtype)
    for layer in bert.encoder.layer[start:end]:
        hidden = bert_layer(layer, hidden, mask, image, image_mask)
    return hidden


def mlm_logits(encoder: BertForMaskedLM, hidden: Tensor) -> Tensor:
    """Official ``BertOnlyMLMHead`` on every position: (B, T, H) -> (B, T, V)."""
    head = encoder.cls.predictions
    transform = head.transform
    x = transform.LayerNorm(F.gelu(transform.dense(hidden)))
    return F.linear(x, head.decoder.weight, head.bias)


# ----------------------------------------------------------- momentum, queue
@torch.no_grad()
def momentum_update_out_of_place(model: ALBEFPretrain) -> None:
    """Official ``_momentum_update``: a new tensor per parameter and step."""
    m = model.config.momentum
    for name, name_m in model.momentum_pairs:
        for p, p_m in zip(getattr(model, name).parameters(), getattr(model, name_m).parameters()):
            p_m.data = p_m.data * m + p.data * (1.0 - m)


@torch.no_grad()
def dequeue_and_enqueue(model: ALBEFPretrain, image_feat: Tensor, text_feat: Tensor) -> None:
    """Official ``_dequeue_and_enqueue`` (host read of the pointer, slice assignment).

    The official code asserts ``queue_size % batch_size == 0``; other sizes fall back to the
    ring buffer of :meth:`ALBEFBase.enqueue`, whose semantics are the same in the divisible case.
    """
    image_feats, text_feats = distributed.all_gather_cat(image_feat), distributed.all_gather_cat(text_feat)
    batch_size, queue_size = image_feats.size(0), model.image_queue.size(1)
    if queue_size % batch_size:
        model.enqueue(image_feat, text_feat)
        return
    ptr = int(model.queue_ptr)
    model.image_queue[:, ptr:ptr + batch_size] = image_feats.T
    model.text_queue[:, ptr:ptr + batch_size] = text_feats.T
    model.queue_ptr[0] = (ptr + batch_size) % queue_size


# -------------------------------------------------------------------- losses
def official_mask(model: ALBEFPretrain, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Official ``ALBEF.mask``: 15% of non-special tokens; 80% [MASK], 10% random, 10% kept."""
    input_ids, labels = input_ids.clone(), input_ids.clone()
    prob = torch.full(labels.shape, model.config.mlm_probability, device=input_ids.device)
    masked = torch.bernoulli(prob).bool()
    for special in model.special_ids:  # [PAD], [CLS]
        masked[input_ids == special] = False
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8, device=input_ids.device)).bool() & masked
    input_ids[replaced] = model.mask_token_id
    random = torch.bernoulli(torch.full(labels.shape, 0.5, device=input_ids.device)).bool() & masked & ~replaced
    random_words = torch.randint(model.config.bert.vocab_size, labels.shape, device=input_ids.device)
    input_ids[random] = random_words[random]
    return input_ids, labels


def _contrastive(
    model: ALBEFPretrain, image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Official ITC with momentum distillation; returns (loss_ita, sim_i2t, sim_t2i)."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / model.temp
        sim_t2i_m = text_feat_m @ image_feat_all / model.temp
        sim_targets = torch.zeros(sim_i2t_m.size(), device=image_feat.device)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / model.temp
    sim_t2i = text_feat @ image_feat_all / model.temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def _draw_negatives(weights: Tensor, given: Tensor | None) -> list[int]:
    """One index per row: ``torch.multinomial(weights[b], 1).item()`` in a loop, or the given draws."""
    if given is not None:
        return [int(i) for i in given.tolist()]
    return [torch.multinomial(weights[b], 1).item() for b in range(weights.size(0))]


def _itm(
    model: ALBEFPretrain, image_embeds: Tensor, image_atts: Tensor, text_embeds: Tensor, attention_mask: Tensor,
    sim_i2t: Tensor, sim_t2i: Tensor, neg_image_idx: Tensor | None, neg_text_idx: Tensor | None,
) -> Tensor:
    """Official ITM: positive fusion pass, hard negatives by a Python loop, a negative fusion pass."""
    bert = model.bert
    output_pos = bert_forward(bert, attention_mask, "fusion", embeds=text_embeds, image=image_embeds,
                              image_atts=image_atts)
    bs = image_embeds.size(0)
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1)
        weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1)
        weights_i2t.fill_diagonal_(0)
        weights_t2i.fill_diagonal_(0)
    image_embeds_neg = torch.stack([image_embeds[i] for i in _draw_negatives(weights_t2i, neg_image_idx)])
    text_idx = _draw_negatives(weights_i2t, neg_text_idx)
    text_embeds_neg = torch.stack([text_embeds[i] for i in text_idx])
    text_atts_neg = torch.stack([attention_mask[i] for i in text_idx])
    text_embeds_all = torch.cat([text_embeds, text_embeds_neg], dim=0)
    text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    image_atts_all = torch.cat([image_atts, image_atts], dim=0)
    output_neg = bert_forward(bert, text_atts_all, "fusion", embeds=text_embeds_all, image=image_embeds_all,
                              image_atts=image_atts_all)
    vl_embeddings = torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0)
    vl_output = model.itm_head(vl_embeddings)
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    return F.cross_entropy(vl_output, itm_labels.to(vl_output.device))


def _mlm(
    model: ALBEFPretrain, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor,
    image_embeds_m: Tensor, image_atts: Tensor, alpha: float, mlm_mask: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Official MLM: full-vocabulary logits of student and teacher, CE + distillation at masked tokens."""
    masked_ids, labels = official_mask(model, input_ids) if mlm_mask is None else mlm_mask
    with torch.no_grad():
        hidden_m = bert_forward(model.bert_m, attention_mask, "multi_modal", input_ids=masked_ids,
                                image=image_embeds_m, image_atts=image_atts)
        logits_m = mlm_logits(model.text_encoder_m, hidden_m)  # (B, T, V)
    hidden = bert_forward(model.bert, attention_mask, "multi_modal", input_ids=masked_ids, image=image_embeds,
                          image_atts=image_atts)
    logits = mlm_logits(model.text_encoder, hidden)  # (B, T, V)
    vocab = logits.size(-1)
    loss = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    soft_labels = F.softmax(logits_m, dim=-1)
    distill = -torch.sum(F.log_softmax(logits, dim=-1) * soft_labels, dim=-1)
    distill = distill[labels != -100].mean()
    return (1 - alpha) * loss + alpha * distill


# ---------------------------------------------------------------------- step
def reference_forward(
    model: ALBEFPretrain, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float,
    neg_image_idx: Tensor | None = None, neg_text_idx: Tensor | None = None,
    mlm_mask: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The official ``ALBEF.forward`` on ``model``'s weights -> ``{'loss_mlm', 'loss_ita', 'loss_itm'}``.

    neg_image_idx (B,): the negative image of each text; neg_text_idx (B,): the negative text of each
    image; mlm_mask: (masked ids (B, T), labels (B, T) with -100 where not masked). Each one given is
    used instead of being drawn. Updates the momentum encoders and the queues, like the official step.
    """
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = vit_forward(model.visual_encoder, image)
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_embeds = bert_forward(model.bert, attention_mask, "text", input_ids=input_ids)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
    with torch.no_grad():
        momentum_update_out_of_place(model)
        image_embeds_m = vit_forward(model.visual_encoder_m, image)
        image_feat_m = F.normalize(model.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        text_embeds_m = bert_forward(model.bert_m, attention_mask, "text", input_ids=input_ids)
        text_feat_m = F.normalize(model.text_proj_m(text_embeds_m[:, 0, :]), dim=-1)
    loss_ita, sim_i2t, sim_t2i = _contrastive(model, image_feat, text_feat, image_feat_m, text_feat_m, alpha)
    dequeue_and_enqueue(model, image_feat_m, text_feat_m)
    loss_itm = _itm(model, image_embeds, image_atts, text_embeds, attention_mask, sim_i2t, sim_t2i,
                    neg_image_idx, neg_text_idx)
    loss_mlm = _mlm(model, input_ids, attention_mask, image_embeds, image_embeds_m, image_atts, alpha, mlm_mask)
    return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm}


def reference_train_step(
    model: ALBEFPretrain, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor, Tensor], alpha: float,
    **draws: Tensor | tuple[Tensor, Tensor] | None,
) -> dict[str, Tensor]:
    """Official training iteration: zero_grad, forward, ``(mlm + ita + itm).backward()``, optimizer step.

    batch: (image, input_ids, attention_mask); draws: ``neg_image_idx``, ``neg_text_idx``, ``mlm_mask``
    as in :func:`reference_forward`. The optimizer should be a plain (non-fused) AdamW. Returns the losses.
    """
    image, input_ids, attention_mask = batch
    optimizer.zero_grad()
    losses = reference_forward(model, image, input_ids, attention_mask, alpha, **draws)
    loss = losses["loss_mlm"] + losses["loss_ita"] + losses["loss_itm"]
    loss.backward()
    optimizer.step()
    return {k: v.detach() for k, v in losses.items()}
