"""The official one-query-at-a-time retrieval reranking, kept as the reference that tests and
``scripts/benchmark.py`` (``retrieval_eval``) compare the batched evaluator of ``models.retrieval_eval`` against.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from models.retrieval_eval import Ranking, RetrievalFeatures, eval_autocast, itc_only, rerank_batched, sorted_ranking


@torch.no_grad()
def rerank_per_query(model: nn.Module, feats: RetrievalFeatures, k_test: int, score: str = "itm",
                     amp: str = "bf16") -> tuple[Ranking, Ranking]:
    """Reference: the official loop, one query's k candidates per fusion call, full padding."""
    if k_test <= 0:
        return itc_only(feats, (0, feats.image_feat.size(0)), (0, feats.text_feat.size(0)))
    device = feats.image_embeds.device
    out = []
    for queries, keys, image_side in ((feats.image_feat, feats.text_feat, True),
                                      (feats.text_feat, feats.image_feat, False)):
        cands, scores = [], []
        for q in range(queries.size(0)):
            sims, cand = (queries[q:q + 1] @ keys.t()).squeeze(0).topk(min(k_test, keys.size(0)))
            img = torch.full_like(cand, q) if image_side else cand
            txt = cand if image_side else torch.full_like(cand, q)
            with eval_autocast(device, amp):
                logits = model.itm_logits(feats.text_embeds[txt], feats.text_atts[txt], feats.image_embeds[img],
                                          cls_only=False)  # the official work: every token, last layer too
            s = logits[:, 1].float()
            scores.append(s + sims if score == "itm+itc" else s)
            cands.append(cand)
        out.append(sorted_ranking(torch.stack(cands), torch.stack(scores)))
    return out[0], out[1]


def compare_rankings(ref: Ranking, other: Ranking) -> tuple[int, float]:
    """Queries whose order differs, and the largest score difference of one (query, candidate) pair.

    The difference is ``inf`` when the shortlists themselves differ. Orders that differ while the scores
    agree to ~1e-7 are exact fp32 ties broken the other way (a random model scores many pairs alike).
    """
    differing = int((ref.indices != other.indices).any(dim=1).sum())
    ref_idx, ref_pos = ref.indices.sort(dim=1)
    other_idx, other_pos = other.indices.sort(dim=1)
    if not torch.equal(ref_idx, other_idx):
        return differing, float("inf")
    diff = (ref.scores.gather(1, ref_pos) - other.scores.gather(1, other_pos)).abs()
    return differing, float(diff.max()) if diff.numel() else 0.0


def benchmark_rerank(model: nn.Module, feats: RetrievalFeatures, k_test: int, batch_size: int = 256,
                     amp: str = "bf16", repeats: int = 1) -> dict[str, float | bool]:
    """Time :func:`rerank_per_query` against :func:`rerank_batched` on the same features.

    Pairs = k x (N_img + N_txt) shortlisted pairs (the work the official code does); the two evaluators run
    ``repeats`` times each, alternating, and the median time of each gives its pairs/s. Returns both, the
    speedup, whether all runs give identical rankings and, by :func:`compare_rankings`, how many queries'
    orders differ and the largest score difference.
    """
    was_training = model.training
    model.eval()
    k = min(k_test, feats.text_feat.size(0), feats.image_feat.size(0))
    pairs = k * (feats.image_feat.size(0) + feats.text_feat.size(0))
    times: dict[str, list[float]] = {"ref": [], "fast": []}
    differing, score_diff = [], []  # per run: queries ordered differently (both directions), largest score gap
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        ref = rerank_per_query(model, feats, k, amp=amp)
        t1 = time.perf_counter()
        fast = rerank_batched(model, feats, k, batch_size=batch_size, amp=amp)
        t2 = time.perf_counter()
        times["ref"].append(t1 - t0)
        times["fast"].append(t2 - t1)
        compared = [compare_rankings(a, b) for a, b in zip(ref, fast)]
        differing.append(sum(n for n, _ in compared))
        score_diff.append(max(d for _, d in compared))
    model.train(was_training)
    t_ref, t_fast = (sorted(times[n])[len(times[n]) // 2] for n in ("ref", "fast"))  # medians
    return {"pairs": pairs, "repeats": len(times["ref"]), "per_query_pairs_per_s": pairs / t_ref,
            "batched_pairs_per_s": pairs / t_fast, "speedup": t_ref / t_fast,
            "identical_rankings": max(differing) == 0, "differing_queries": max(differing),
            "max_score_diff": max(score_diff)}
