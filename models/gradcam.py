"""Grad-CAM of ALBEF: where in the image the model finds a text (paper Sec. 6.4, Figs. 4-6).

Two modes, computed as the official ``Grounding.py`` (``val``) and ``visualization.ipynb`` do:

* ``itm``: the gradient of the ITM positive logit with respect to the cross-attention probabilities of fusion
  layer ``block_num`` (official default 8, the third fusion layer of the 12-layer BERT). The image [CLS] column
  is dropped, padded text rows are zeroed, and the map is ``attention * gradient.clamp(0)`` averaged over heads
  (per-token maps, Figs. 4-6) and then over the text tokens (the sentence map used for grounding). The token
  mean divides by the padded length, as the official code does; the ranking of boxes in one image is unchanged.
* ``itc``: the gradient of the image-text ITC similarity (``image_feat . text_feat / temp``) with respect to the
  [CLS]-to-patch self-attention of ViT block ``block_num``, ``attention * gradient.clamp(0)`` averaged over heads.

* VQA (:func:`answer_gradcam`, paper Fig. 5): the VQA model has neither ITM head nor contrastive projections, so
  its map is the ``itm`` computation with another score: the answer decoder's log-likelihood of a given answer
  (the official code has no VQA Grad-CAM; this score explains the answer the model gives), on the cross-attention
  of the encoder's fusion layer ``block_num``.

The patch grid (``image_res / patch_size``) and the head counts come from the model's configuration. Attention
is computed explicitly (and kept) only inside :func:`gradcam` and :func:`answer_gradcam`; training keeps the
fused attention path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from models.albef import ALBEFBase
from models.vit import saved_attention

MODES = ("itm", "itc")


def patch_grid(model: ALBEFBase) -> int:
    """Side G of the ViT patch grid (24 for ALBEF at 384 px)."""
    return model.config.image_res // model.config.patch_size


def default_block(model: ALBEFBase, mode: str) -> int:
    """The layer whose attention Grad-CAM reads when ``block_num`` is not given.

    ``itm``: the third fusion layer (``fusion_layer + 2``, the official 8), or for a BERT with fewer fusion
    layers the second-to-last layer (at least the first fusion layer): in the last layer only the [CLS] row
    reaches the ITM head, so per-token maps there would be empty. ``itc``: ViT block ``round(2/3 * depth)``
    (the official 8 of 12), at most the last block.
    """
    if mode == "itm":
        cfg = model.config.bert
        return max(cfg.fusion_layer, min(cfg.fusion_layer + 2, cfg.num_hidden_layers - 2))
    if mode == "itc":
        depth = model.config.vision_depth
        return min(round(2 * depth / 3), depth - 1)
    raise ValueError(f"gradcam mode must be one of {MODES}, not {mode!r}")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def gradcam(
    model: ALBEFBase, image: Tensor, input_ids: Tensor, attention_mask: Tensor, mode: str = "itm",
    block_num: int | None = None,
) -> dict[str, Tensor]:
    """Grad-CAM maps of (image, text) pairs.

    Args:
        model: any ALBEF model with ``itm_head`` and the contrastive projections (pre-training, retrieval,
            grounding); run in eval mode for the call, its parameter gradients are left untouched.
        image: (B, 3, R, R) normalised images.
        input_ids, attention_mask: (B, T) tokenised texts ([CLS] first).
        mode: ``'itm'`` or ``'itc'`` (see the module docstring).
        block_num: BERT layer index (``itm``, counted over all 12 layers as the official flag) or ViT block
            (``itc``); ``None``: :func:`default_block`.

    Returns:
        ``{'map': (B, G, G), 'score': (B,)}`` (the backpropagated ITM positive logit or ITC similarity), and in
        ``itm`` mode ``'token_maps': (B, T, G, G)``, one map per text token (zero at padding).

    Raises:
        ValueError: unknown mode, a model without ITM head (VQA: :func:`answer_gradcam`), or ``block_num`` names a
            layer without cross-attention (``itm``).
        IndexError: ``block_num`` is not a ViT block (``itc``).
    """
    if not hasattr(model, "itm_head"):
        raise ValueError(f"{type(model).__name__} has no ITM head or contrastive projections: for a VQA model use "
                         "answer_gradcam (the likelihood of an answer)")
    block = default_block(model, mode) if block_num is None else block_num
    with _evaluating(model), torch.enable_grad():
        if mode == "itm":
            return _itm_gradcam(model, image, input_ids, attention_mask, block)
        return _itc_gradcam(model, image, input_ids, attention_mask, block)


def _cross_attention(model: ALBEFBase, block: int) -> nn.Module:
    """The cross-attention (``BertSelfAttention``) of BERT layer ``block``; ValueError for a text-only layer."""
    layers = model.bert.encoder.layer
    if not 0 <= block < len(layers) or not layers[block].has_cross_attention:
        fusion = model.config.bert.fusion_layer
        raise ValueError(f"itm Grad-CAM needs a fusion layer: block_num {block} is not in "
                         f"[{fusion}, {len(layers)})")
    return layers[block].crossattention.self


def _itm_gradcam(model: ALBEFBase, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 block: int) -> dict[str, Tensor]:
    attention = _cross_attention(model, block)
    attention.save_attention = True
    try:
        with torch.no_grad():  # the ViT's own graph is not needed: the gradient stops at the attention
            image_embeds, _ = model.encode_image(image)  # (B, 1+G*G, D)
        # a leaf that needs a gradient: the attention then needs one even if every weight is frozen
        image_embeds.requires_grad_(True)
        text_embeds, _ = model.encode_text(input_ids, attention_mask)  # (B, T, H)
        # every row of every layer, as the official multi-modal pass (per-token maps read all rows)
        score = model.itm_logits(text_embeds, attention_mask, image_embeds, cls_only=False)[:, 1]  # (B,)
        probs = attention.attention_map  # (B, nh, T, 1+G*G)
    finally:
        attention.save_attention = False
        attention.attention_map = None
    (grad,) = torch.autograd.grad(score.sum(), probs)
    token_maps = _weigh(probs, grad, attention_mask, patch_grid(model))  # (B, T, G, G)
    return {"map": token_maps.mean(1), "token_maps": token_maps, "score": score.detach()}


def answer_gradcam(
    model: ALBEFBase, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
    answer_mask: Tensor, block_num: int | None = None,
) -> dict[str, Tensor]:
    """Grad-CAM of a VQA model (``models.model_vqa.ALBEFVQA``): where the encoder looks for the answer.

    Args:
        model: the VQA model (``visual_encoder``, ``text_encoder`` with fusion layers, ``text_decoder``).
        image: (B, 3, R, R) normalised images.
        question_ids, question_mask: (B, Tq) tokenised questions.
        answer_ids, answer_mask: (B, Ta) one answer per question, ``[CLS] answer [SEP] [PAD]..``
            (``models.vqa_rank.tokenize_answers``).
        block_num: the encoder's fusion layer (``None``: :func:`default_block` in ``itm`` mode, the official 8).

    Returns:
        ``{'map': (B, G, G), 'token_maps': (B, Tq, G, G), 'score': (B,)}``: the maps as in ``itm`` mode, with the
        gradient of ``score``, the answer's log-likelihood (summed over its tokens, ``[SEP]`` included).

    Raises:
        ValueError: ``block_num`` names a layer without cross-attention.
    """
    block = default_block(model, "itm") if block_num is None else block_num
    with _evaluating(model), torch.enable_grad():
        attention = _cross_attention(model, block)
        attention.save_attention = True
        try:
            with torch.no_grad():
                image_embeds = model.visual_encoder(image)  # (B, 1+G*G, D)
            image_embeds.requires_grad_(True)
            states = model.text_encoder(question_ids, question_mask, image_embeds)  # (B, Tq, H), every layer
            probs = attention.attention_map  # (B, nh, Tq, 1+G*G)
        finally:
            attention.save_attention = False
            attention.attention_map = None
        decoder = model.text_decoder
        rows = torch.arange(image.size(0), device=image.device)  # answer b attends to question b
        hidden = decoder(answer_ids, answer_mask, decoder.question_keys_values(states), question_mask, rows)
        targets = answer_ids[:, 1:]  # (B, Ta-1): position t predicts token t+1
        log_probs = decoder.cls(hidden[:, :-1]).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        score = (log_probs * (targets != model.pad_token_id)).sum(1)  # (B,)
        (grad,) = torch.autograd.grad(score.sum(), probs)
    token_maps = _weigh(probs, grad, question_mask, patch_grid(model))  # (B, Tq, G, G)
    return {"map": token_maps.mean(1), "token_maps": token_maps, "score": score.detach()}


def _weigh(probs: Tensor, grad: Tensor, attention_mask: Tensor, grid: int) -> Tensor:
    """Cross-attention (B, nh, T, 1+G*G) and its gradient -> per-token maps (B, T, G, G), mean over heads."""
    b, nh, t, s = probs.shape
    if s != 1 + grid * grid:
        raise ValueError(f"cross-attention has {s} image keys, expected 1 + {grid}x{grid} (image_res / patch)")
    mask = attention_mask.view(b, 1, t, 1, 1).to(probs.dtype)
    cam = probs.detach()[..., 1:].reshape(b, nh, t, grid, grid) * mask  # image [CLS] column dropped
    positive = grad[..., 1:].clamp(min=0).reshape(b, nh, t, grid, grid) * mask
    return (cam * positive).mean(1)


def _itc_gradcam(model: ALBEFBase, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 block: int) -> dict[str, Tensor]:
    image = image.detach().requires_grad_(True)  # the attention needs a gradient even with frozen weights
    with saved_attention(model.visual_encoder, block) as recorded:
        _, image_feat = model.encode_image(image)  # (B, E)
    probs = recorded[-1]  # (B, nh, 1+G*G, 1+G*G)
    _, text_feat = model.encode_text(input_ids, attention_mask, cls_only=True)  # (B, E)
    score = (image_feat * text_feat).sum(-1) / model.temp  # (B,): the diagonal of image_feat @ text_feat.T / temp
    (grad,) = torch.autograd.grad(score.sum(), probs)
    b, nh, s, _ = probs.shape
    grid = patch_grid(model)
    if s != 1 + grid * grid:
        raise ValueError(f"ViT attention has {s} tokens, expected 1 + {grid}x{grid} (image_res / patch)")
    cam = probs.detach()[:, :, 0, 1:].reshape(b, nh, grid, grid)  # [CLS] query -> patches
    positive = grad[:, :, 0, 1:].reshape(b, nh, grid, grid).clamp(min=0)
    return {"map": (cam * positive).mean(1), "score": score.detach()}
