"""Image-text retrieval evaluation as in the paper (official ``Retrieval.py::evaluation`` / ``itm_eval``).

1. Encode every text (``max_length=30``, padded) and image with the unimodal encoders; ITC
   similarities ``image_feat @ text_feat.T``.
2. For each image, shortlist the ``k_test`` best texts by ITC; for each text, the ``k_test`` best
   images; rescore the shortlisted pairs with the fusion encoder (ITM positive logit, optionally plus
   the ITC similarity) and sort. ``k_test: 0`` ranks by ITC alone. Texts/images outside a shortlist
   are never retrieved (the official fills them with -100).
3. TR R@K: an image counts as a hit when ANY of its captions is within its first K; IR R@K: a caption's
   one image is within its first K.

Speed (REFERENCE_NOTES 3C.11): the fusion encoder runs on batches of (image, text) pairs spanning many
queries of both directions, each distinct pair once, with text padding trimmed per batch and bf16
autocast on CUDA. Work that does not depend on the pair is done once: the first fusion layer's
self-attention per text, every fusion layer's cross-attention keys and values per image; the last
fusion layer runs for [CLS] alone (:func:`itm_logits_cached`). Under DDP each rank reranks a
contiguous share of the queries and only the (query, k) candidate indices and scores are gathered.
``models.retrieval_reference.rerank_per_query`` is the one-query-at-a-time reference (as the official code)
for tests and ``scripts/benchmark.py`` (``retrieval_eval``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dataset import DataError, RetrievalEvalDataset, create_loader
from engine import distributed
from models.bert import CLS, extended_mask
from models.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
KV_CACHE_BYTES = 2**30  # cross-attention keys/values of a group of images in pair_scores
# On CPU a fusion batch gathers at most this many bytes of image keys (and of values): fresh large buffers
# cost page faults that outweigh bigger matrix products (full size: 9 pairs a batch, 2.5x faster than 256).
CPU_GATHER_BYTES = 2**24
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RetrievalFeatures:
    """Unimodal outputs of a whole evaluation split."""

    image_embeds: Tensor  # (N_img, S, D) ViT tokens
    image_feat: Tensor  # (N_img, E) normalised projections
    text_embeds: Tensor  # (N_txt, T, H) text-layer states
    text_atts: Tensor  # (N_txt, T) attention masks
    text_feat: Tensor  # (N_txt, E)


@dataclass
class Ranking:
    """Each query's candidates, best first: indices (N_q, k) long and their scores (N_q, k)."""

    indices: Tensor
    scores: Tensor


def eval_autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; nothing elsewhere or with ``amp='off'``."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AMP[amp])


# ------------------------------------------------------------------ encoding
@torch.no_grad()
def encode_texts(model: nn.Module, texts: list[str], tokenizer: TextTokenizer, device: torch.device,
                 batch_size: int = 256, max_length: int = 30, amp: str = "bf16") -> tuple[Tensor, Tensor, Tensor]:
    """N texts -> text states (N, T, H), attention masks (N, T), features (N, E); T = ``max_length``."""
    embeds, atts, feats = [], [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], max_length=max_length, padding="max_length").to(device)
        with eval_autocast(device, amp):
            text_embeds, text_feat = model.encode_text(batch.input_ids, batch.attention_mask)
        embeds.append(text_embeds)
        atts.append(batch.attention_mask)
        feats.append(text_feat.float())
    return torch.cat(embeds), torch.cat(atts), torch.cat(feats)


@torch.no_grad()
def encode_images(model: nn.Module, dataset: RetrievalEvalDataset, device: torch.device, batch_size: int = 64,
                  num_workers: int = 0, amp: str = "bf16") -> tuple[Tensor, Tensor]:
    """Every image of ``dataset`` once (no distributed padding) -> tokens (N, S, D), features (N, E).

    Unreadable images keep all-zero rows, with a warning; a batch of them only is skipped. Their number is
    ``model.last_unreadable_images`` afterwards (0 when all were read).
    """
    loader = create_loader(dataset, batch_size, num_workers, shuffle=False, seed=0, drop_last=False)
    n = len(dataset)
    embeds = feats = None
    seen = torch.zeros(n, dtype=torch.bool)
    for batch in loader:
        if batch is None or len(batch) == 1:  # (dropped count,) alone: every image of the batch unreadable
            continue
        image, index, _ = batch
        with eval_autocast(device, amp):
            image_embeds, image_feat = model.encode_image(image.to(device, non_blocking=True))
        if embeds is None:
            embeds = image_embeds.new_zeros((n, *image_embeds.shape[1:]))
            feats = image_feat.new_zeros((n, image_feat.size(1)), dtype=torch.float32)
        embeds[index.to(device)] = image_embeds
        feats[index.to(device)] = image_feat.float()
        seen[index] = True
    if embeds is None:
        raise DataError(f"no readable image among the {n} of the evaluation set (image_root and the paths in "
                        "val_file / test_file?)")
    unreadable = int((~seen).sum())
    if unreadable:
        logger.warning("%d of %d evaluation images were unreadable: their features are zero", unreadable, n)
    _set_unreadable(model, unreadable)
    return embeds, feats


def _set_unreadable(model: nn.Module, count: int) -> None:
    object.__setattr__(model, "last_unreadable_images", count)  # a plain attribute, not a module buffer


def encode_dataset(model: nn.Module, dataset: RetrievalEvalDataset, tokenizer: TextTokenizer,
                   device: torch.device, batch_size: int = 64, text_batch: int = 256, max_length: int = 30,
                   num_workers: int = 0, amp: str = "bf16") -> RetrievalFeatures:
    """Unimodal features of all images and captions of an evaluation split."""
    text_embeds, text_atts, text_feat = encode_texts(model, dataset.text, tokenizer, device, text_batch,
                                                     max_length, amp)
    image_embeds, image_feat = encode_images(model, dataset, device, batch_size, num_workers, amp)
    return RetrievalFeatures(image_embeds, image_feat, text_embeds, text_atts, text_feat)


# ------------------------------------------------------------------ ITC shortlist and ITM rerank
def itc_topk(query_feat: Tensor, key_feat: Tensor, k: int, rows: tuple[int, int] | None = None,
             chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar keys of query rows [a, b): (sims (n, k), indices (n, k)), best first.

    query_feat (N_q, E), key_feat (N_k, E); never builds the full N_q x N_k matrix.
    """
    a, b = rows if rows is not None else (0, query_feat.size(0))
    k = min(k, key_feat.size(0))
    sims = [query_feat.new_zeros((0, k))]
    idx = [torch.zeros((0, k), dtype=torch.long, device=query_feat.device)]
    for start in range(a, b, chunk):
        top = (query_feat[start:min(b, start + chunk)] @ key_feat.t()).topk(k, dim=1)  # of (c, N_k)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def text_self_attention(model: nn.Module, text_embeds: Tensor, text_atts: Tensor, batch_size: int = 256) -> Tensor:
    """The first fusion layer's self-attention block on text states (N, T, H): it sees no image, so once a text."""
    layer = model.bert.fusion_layers[0]
    return torch.cat([layer.attention(text_embeds[a:a + batch_size],
                                      extended_mask(text_atts[a:a + batch_size], text_embeds.dtype))
                      for a in range(0, text_embeds.size(0), batch_size)])


def _gather(table: Tensor, index: Tensor, buffer: Tensor | None) -> Tensor:
    """``table[index]`` (index_select: several times faster than ``[]``), into ``buffer`` when given."""
    if buffer is None:
        return table.index_select(0, index)
    return torch.index_select(table, 0, index, out=buffer[:index.numel()])


def itm_logits_cached(model: nn.Module, text_states: Tensor, text_atts: Tensor,
                      keys_values: list[tuple[Tensor, Tensor]], image: Tensor,
                      buffers: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``model.itm_logits(text_embeds, text_atts, image_embeds[image])`` -> (B, 2), the same math done once.

    ``text_states`` are :func:`text_self_attention` of the text states (per text, not per pair);
    ``keys_values`` (from ``model.bert.image_keys_values``) hold each image's cross-attention keys and values,
    gathered per pair by ``image`` (B,) (into ``buffers`` (>= B, S, H) when given) instead of projecting
    the image tokens again for every pair; the last fusion layer runs for [CLS] alone (the only token the
    ITM head reads; its keys still see all).
    """
    mask = extended_mask(text_atts, text_states.dtype)
    layers = model.bert.fusion_layers
    key_buf, value_buf = buffers if buffers is not None else (None, None)
    hidden = text_states
    for n, (layer, (keys, values)) in enumerate(zip(layers, keys_values)):
        kv = (_gather(keys, image, key_buf), _gather(values, image, value_buf))
        rows = CLS if n == len(layers) - 1 else None
        if n == 0:  # its self-attention ran once per text (text_self_attention)
            hidden = layer.after_self_attention(hidden if rows is None else hidden[:, rows], image_kv=kv)
        else:
            hidden = layer(hidden, mask, image_kv=kv, rows=rows)
    return model.itm_head(hidden[:, 0])


def _pairs_per_batch(model: nn.Module, image_embeds: Tensor, batch_size: int) -> int:
    """``batch_size``, capped on CPU so one batch's gathered keys stay within :data:`CPU_GATHER_BYTES`."""
    if image_embeds.device.type != "cpu":
        return batch_size
    per_pair = image_embeds.size(1) * model.bert.config.hidden_size * image_embeds.element_size()
    return max(1, min(batch_size, CPU_GATHER_BYTES // per_pair))


def _images_per_group(model: nn.Module, image_embeds: Tensor) -> int:
    """Images whose keys and values of all fusion layers fit in :data:`KV_CACHE_BYTES`."""
    hidden = model.bert.config.hidden_size
    per_image = 2 * len(model.bert.fusion_layers) * image_embeds.size(1) * hidden * image_embeds.element_size()
    return max(1, KV_CACHE_BYTES // per_image)


def _score_image_group(model: nn.Module, feats: RetrievalFeatures, text_states: Tensor, text_slot: Tensor,
                       group: Tensor, img: Tensor, txt: Tensor, batch_size: int) -> Tensor:
    """ITM positive logits (P,) of pairs (img, txt) whose images all are in ``group`` (sorted indices)."""
    lengths = feats.text_atts.sum(dim=1)[txt]
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(img.numel(), dtype=torch.float32, device=img.device)
    keys_values = model.bert.image_keys_values(feats.image_embeds[group])
    table = keys_values[0][0]
    buffers = (table.new_empty((batch_size, *table.shape[1:])), table.new_empty((batch_size, *table.shape[1:])))
    for start in range(0, order.numel(), batch_size):
        chunk = order[start:start + batch_size]
        t, width = txt[chunk], int(lengths[chunk].max())
        logits = itm_logits_cached(model, text_states[:, :width].index_select(0, text_slot[t]),
                                   feats.text_atts[:, :width].index_select(0, t), keys_values,
                                   torch.searchsorted(group, img[chunk]), buffers)
        out[chunk] = logits[:, 1].float()
    return out


@torch.no_grad()
def pair_scores(model: nn.Module, feats: RetrievalFeatures, img_idx: Tensor, txt_idx: Tensor,
                batch_size: int = 256, amp: str = "bf16") -> Tensor:
    """ITM positive logit of P (image, text) pairs -> (P,) float32, each distinct pair computed once.

    The first fusion layer's self-attention runs once per text; images are taken in groups
    (:func:`_images_per_group`) whose cross-attention keys and values are projected once; the group's
    pairs are sorted by text length so each fusion batch of ``batch_size`` pairs (fewer on CPU:
    :func:`_pairs_per_batch`) trims its padding. Extra memory: one (N_txt, T, H) tensor, the size of
    ``feats.text_embeds``, and the keys and values of a group (<= :data:`KV_CACHE_BYTES`).
    """
    n_txt = feats.text_feat.size(0)
    unique, inverse = torch.unique(img_idx * n_txt + txt_idx, return_inverse=True)  # image-major order
    img_u, txt_u = unique // n_txt, unique % n_txt
    texts, images = torch.unique(txt_u), torch.unique(img_u)
    slot = torch.zeros(n_txt, dtype=torch.long, device=texts.device)
    slot[texts] = torch.arange(texts.numel(), device=texts.device)
    per_group = _images_per_group(model, feats.image_embeds)
    pairs_per_batch = _pairs_per_batch(model, feats.image_embeds, batch_size)
    scores = []
    with eval_autocast(feats.image_embeds.device, amp):
        text_states = text_self_attention(model, feats.text_embeds[texts], feats.text_atts[texts], batch_size)
        for g in range(0, images.numel(), per_group):
            group = images[g:g + per_group]
            lo = int(torch.searchsorted(img_u, group[0]))
            hi = int(torch.searchsorted(img_u, group[-1], right=True))
            scores.append(_score_image_group(model, feats, text_states, slot, group, img_u[lo:hi], txt_u[lo:hi],
                                             pairs_per_batch))
    return torch.cat(scores)[inverse]


def sorted_ranking(candidates: Tensor, scores: Tensor) -> Ranking:
    order = scores.argsort(dim=1, descending=True, stable=True)
    return Ranking(candidates.gather(1, order), scores.gather(1, order))


def itc_only(feats: RetrievalFeatures, rows_i2t: tuple[int, int],
              rows_t2i: tuple[int, int]) -> tuple[Ranking, Ranking]:
    """ITC-only rankings, as deep as the largest recall K."""
    depth = max(RECALL_KS)
    sims_i2t, cand_i2t = itc_topk(feats.image_feat, feats.text_feat, depth, rows_i2t)
    sims_t2i, cand_t2i = itc_topk(feats.text_feat, feats.image_feat, depth, rows_t2i)
    return Ranking(cand_i2t, sims_i2t), Ranking(cand_t2i, sims_t2i)


@torch.no_grad()
def rerank_batched(model: nn.Module, feats: RetrievalFeatures, k_test: int, score: str = "itm",
                   batch_size: int = 256, amp: str = "bf16", rows_i2t: tuple[int, int] | None = None,
                   rows_t2i: tuple[int, int] | None = None) -> tuple[Ranking, Ranking]:
    """Rank texts for image rows ``rows_i2t`` and images for text rows ``rows_t2i`` (default: all).

    Returns (i2t (n_i, k), t2i (n_t, k)) rankings; ``k_test == 0``: ITC only, 10 deep.
    """
    rows_i2t = rows_i2t or (0, feats.image_feat.size(0))
    rows_t2i = rows_t2i or (0, feats.text_feat.size(0))
    if k_test <= 0:
        return itc_only(feats, rows_i2t, rows_t2i)
    sims_i2t, cand_i2t = itc_topk(feats.image_feat, feats.text_feat, k_test, rows_i2t)  # (n_i, k_i)
    sims_t2i, cand_t2i = itc_topk(feats.text_feat, feats.image_feat, k_test, rows_t2i)  # (n_t, k_t)
    device = cand_i2t.device
    queries_i = torch.arange(*rows_i2t, device=device).repeat_interleave(cand_i2t.size(1))
    queries_t = torch.arange(*rows_t2i, device=device).repeat_interleave(cand_t2i.size(1))
    scores = pair_scores(model, feats, torch.cat([queries_i, cand_t2i.flatten()]),
                         torch.cat([cand_i2t.flatten(), queries_t]), batch_size, amp)
    s_i2t, s_t2i = scores[:queries_i.numel()].view_as(sims_i2t), scores[queries_i.numel():].view_as(sims_t2i)
    if score == "itm+itc":
        s_i2t, s_t2i = s_i2t + sims_i2t, s_t2i + sims_t2i
    return sorted_ranking(cand_i2t, s_i2t), sorted_ranking(cand_t2i, s_t2i)


# ------------------------------------------------------------------ distributed
def gather_ranking(local: Ranking, n: int) -> Ranking:
    """Concatenate every rank's ``distributed.shard_range`` rows of the ``n`` queries, each once, in order."""
    return Ranking(distributed.gather_rows(local.indices, n), distributed.gather_rows(local.scores, n))


# ------------------------------------------------------------------ metrics
def first_hit(hit: Tensor) -> Tensor:
    """(N_q, k) bool -> rank of the first True per row (N_q,) long; ``k`` when a row has none."""
    found = hit.any(dim=1)
    return torch.where(found, hit.float().argmax(dim=1), torch.full_like(found, hit.size(1), dtype=torch.long))


def recall_metrics(i2t: Ranking, t2i: Ranking, txt2img: Tensor) -> dict[str, float]:
    """Official TR/IR R@1/5/10 (percent), their means and ``r_mean`` from the rankings.

    txt2img (N_txt,) long: each caption's image. TR: rank of an image's best-placed caption. A match outside
    the shortlist is a miss at every K, also K > k_test (``first_hit`` gives it rank k, which is < K then).
    """
    txt2img = txt2img.to(i2t.indices.device)
    n_img = i2t.indices.size(0)
    i2t_hit = txt2img[i2t.indices] == torch.arange(n_img, device=txt2img.device)[:, None]  # (N_img, k)
    t2i_hit = t2i.indices == txt2img.to(t2i.indices.device)[:, None]  # (N_txt, k)
    hits = {"txt": i2t_hit, "img": t2i_hit}
    out: dict[str, float] = {}
    for name, hit in hits.items():
        r = torch.where(hit.any(dim=1), first_hit(hit), torch.iinfo(torch.long).max)  # misses: never within K
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * (r < k).float().mean().item()
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def metrics_from_scores(score_i2t: Tensor, score_t2i: Tensor, txt2img: Tensor) -> dict[str, float]:
    """R@K from dense score matrices (N_img, N_txt) and (N_txt, N_img), as the official ``itm_eval``."""
    full = sorted_ranking(torch.arange(score_i2t.size(1)).expand_as(score_i2t), score_i2t)
    full_t = sorted_ranking(torch.arange(score_t2i.size(1)).expand_as(score_t2i), score_t2i)
    return recall_metrics(full, full_t, txt2img)


# ------------------------------------------------------------------ entry points
@torch.no_grad()
def rank_all(model: nn.Module, feats: RetrievalFeatures, k_test: int, score: str = "itm",
             batch_size: int = 256, amp: str = "bf16") -> tuple[Ranking, Ranking]:
    """Both directions over all queries, this rank reranking its share; identical result on every rank."""
    n_img, n_txt = feats.image_feat.size(0), feats.text_feat.size(0)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    i2t, t2i = rerank_batched(model, feats, k_test, score, batch_size, amp,
                              distributed.shard_range(n_img, rank, world), distributed.shard_range(n_txt, rank, world))
    return gather_ranking(i2t, n_img), gather_ranking(t2i, n_txt)


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, dataset: RetrievalEvalDataset, tokenizer: TextTokenizer,
                       device: torch.device, k_test: int, score: str = "itm", batch_size: int = 64,
                       text_batch: int = 256, rerank_batch: int = 256, max_length: int = 30,
                       num_workers: int = 0, amp: str = "bf16") -> dict[str, float]:
    """Encode, shortlist, rerank and score a split; returns the official metric names (percent)."""
    if score not in ("itm", "itm+itc"):
        raise ValueError(f"score must be 'itm' or 'itm+itc', not {score!r}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    feats = encode_dataset(model, dataset, tokenizer, device, batch_size, text_batch, max_length, num_workers, amp)
    encoded = time.perf_counter()
    i2t, t2i = rank_all(model, feats, k_test, score, rerank_batch, amp)
    txt2img = torch.tensor([dataset.txt2img[t] for t in range(len(dataset.text))], dtype=torch.long)
    metrics = recall_metrics(i2t, t2i, txt2img)
    # how much was evaluated: every text, and every image but the unreadable ones (zero features)
    metrics.update(images=len(dataset), texts=len(dataset.text),
                   unreadable_images=getattr(model, "last_unreadable_images", 0))
    model.train(was_training)
    logger.info("retrieval eval: %d images, %d texts, k_test %d, encode %.1fs, rank %.1fs", len(dataset),
                len(dataset.text), k_test, encoded - start, time.perf_counter() - encoded)
    return metrics
