"""Answer ranking over a fixed answer list, as the official ALBEF ``rank_answer`` (``models/model_vqa.py``).

For each question:

1. decode ``[CLS]`` (the BOS, the first token of every tokenised answer) and read, from the softmax of its
   vocabulary logits, the probability ``p1(a)`` of every answer's first token;
2. keep the ``k`` answers with the highest ``p1`` (answers that share a first token have equal ``p1``);
3. score each candidate ``log p1(a) + sum_t log p(a_t | a_<t)`` over ALL its tokens including the first one
   and the final ``[SEP]``: the first token counts twice and there is no length normalisation (the official
   quirks, kept because they decide rankings);
4. softmax the k scores; the answer is the best.

Deterministic tie-break (``torch.topk`` does not define one): both selections are stable sorts, so among
candidates with equal first-token probability the one earlier in the answer list is kept (step 2) and ranks
first among equal final probabilities (step 4).

:func:`rank_answers` batches every question and candidate with no per-question Python loop and computes
each question's cross-attention keys and values once for its k candidates; the BOS position, identical for
all candidates of a question, is decoded once (its keys and values are reused as a prefix); the candidates'
positions that predict a token (not the final ``[SEP]``, not padding) are the only ones decoded, packed, and
the LM head runs on them alone. :func:`rank_answers_reference` is the straightforward
re-implementation of the official function (question states repeated k times, full decoder passes) that
the tests and the benchmark compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dataset import collate_skip_none
from engine import distributed
from models.decoder import AnswerDecoder
from models.tokenizer import TextBatch, TextTokenizer

LM_HEAD_ROWS = 4096  # rows per vocabulary-projection chunk: bounds the (rows, V) logits in memory


def tokenize_answers(tokenizer: TextTokenizer, answers: Sequence[str], eos: str = "[SEP]",
                     max_length: int = 512) -> TextBatch:
    """``[CLS] answer eos [PAD]..`` (N, T), padded to the longest, as the official ``answer + eos`` (no
    truncation below ``max_length``, the decoder's position limit)."""
    return tokenizer([a + eos for a in answers], max_length=max_length)


def select_candidates(first_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k answers of highest first-token probability per question, ties to the lower list index.

    first_probs (Q, A) -> (probs (Q, k), answer indices (Q, k)), best first.
    """
    order = torch.sort(first_probs, dim=1, descending=True, stable=True).indices[:, :k]
    return first_probs.gather(1, order), order


def _rerank(candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the k scores (Q, k), then sort candidates by it (stable: ties keep step-2 order)."""
    probs = scores.softmax(dim=1)
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices
    return candidates.gather(1, order), probs.gather(1, order)


@torch.no_grad()
def rank_answers(
    decoder: AnswerDecoder, question_states: Tensor, question_atts: Tensor, answer_ids: Tensor,
    answer_atts: Tensor, k: int, pad_token_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Rank the answer list for Q questions; returns answer indices (Q, k) and probabilities (Q, k), best first.

    question_states (Q, S, H) fused question states, question_atts (Q, S) their mask; answer_ids,
    answer_atts (A, T): the tokenised answer list (``[CLS] answer [SEP] [PAD]..``, see
    :func:`tokenize_answers`); k: candidates per question, at most A.
    """
    num_answers = answer_ids.size(0)
    if not 0 < k <= num_answers:
        raise ValueError(f"k must be in 1..{num_answers} (the answer-list size), got {k}")
    question_kv = decoder.question_keys_values(question_states)  # once per question, for all its candidates
    logits, prefix = decoder.start(int(answer_ids[0, 0]), question_kv, question_atts)  # (Q, V)
    first = answer_ids[:, 1]  # (A,) first answer token
    top_probs, candidates = select_candidates(logits.softmax(dim=1).index_select(1, first), k)  # (Q, k)
    first_logp = logits.log_softmax(dim=1).gather(1, first[candidates])  # (Q, k), the second count
    rest = _continuation_log_likelihood(decoder, answer_ids, answer_atts, candidates, prefix, question_kv,
                                        question_atts, pad_token_id)
    return _rerank(candidates, top_probs.log() + first_logp + rest)


def _continuation_log_likelihood(
    decoder: AnswerDecoder, answer_ids: Tensor, answer_atts: Tensor, candidates: Tensor, prefix: list,
    question_kv: list, question_atts: Tensor, pad_token_id: int,
) -> Tensor:
    """sum_{t >= 2} log p(a_t | a_<t) of each candidate (Q, k): every token after the first, [SEP] included."""
    q, k = candidates.shape
    ids = answer_ids.index_select(0, candidates.reshape(-1))  # (N, T), N = Q*k, question by question
    length = int(answer_atts.index_select(0, candidates.reshape(-1)).sum(dim=1).max())  # longest candidate
    if length <= 2:  # every candidate is [CLS] + one token: nothing after the first token
        return question_atts.new_zeros((q, k), dtype=question_kv[0][0].dtype)
    inputs, targets = ids[:, 1:length - 1], ids[:, 2:length]  # (N, L): position j+1 predicts token j+2
    decode = targets != pad_token_id  # the official label mask; the final [SEP] predicts nothing
    hidden = decoder.decode_candidates(inputs, decode, prefix, question_kv, question_atts)  # (M, H)
    row_targets = targets[decode]  # (M,)
    logp = torch.cat([  # chunks of rows: the (rows, V) logits stay small
        decoder.cls(h).log_softmax(dim=-1).gather(1, t[:, None])[:, 0]
        for h, t in zip(hidden.split(LM_HEAD_ROWS), row_targets.split(LM_HEAD_ROWS))
    ])
    per_token = torch.zeros(decode.shape, dtype=logp.dtype, device=logp.device).masked_scatter(decode, logp)
    return per_token.sum(dim=1).view(q, k)


@torch.no_grad()
def rank_answers_reference(
    decoder: AnswerDecoder, question_states: Tensor, question_atts: Tensor, answer_ids: Tensor,
    answer_atts: Tensor, k: int, pad_token_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """The official ``rank_answer`` written plainly (same inputs and outputs as :func:`rank_answers`).

    The question states are repeated k times and the decoder runs on the full padded candidates, so each
    candidate projects its question's cross-attention keys and values again and the LM head runs at every
    position. Candidate selection uses the same stable tie-break as :func:`rank_answers`.
    """
    q = question_states.size(0)
    start_ids = answer_ids[:1, :1].expand(q, 1)  # (Q, 1) the BOS
    start = decoder.bert(start_ids, torch.ones_like(start_ids), question_states, question_atts, is_causal=True)
    logits = decoder.cls(start[:, 0])  # (Q, V)
    top_probs, candidates = select_candidates(logits.softmax(dim=1).index_select(1, answer_ids[:, 1]), k)
    ids = answer_ids.index_select(0, candidates.reshape(-1))  # (N, T)
    atts = answer_atts.index_select(0, candidates.reshape(-1))
    targets = ids.masked_fill(ids == pad_token_id, -100)
    states = question_states.repeat_interleave(k, dim=0)  # (N, S, H)
    hidden = decoder.bert(ids, atts, states, question_atts.repeat_interleave(k, dim=0), is_causal=True)
    token_logits = decoder.cls(hidden)[:, :-1]  # (N, T-1, V)
    loss = F.cross_entropy(token_logits.reshape(-1, token_logits.size(-1)), targets[:, 1:].reshape(-1),
                           reduction="none").view(ids.size(0), -1).sum(dim=1)
    return _rerank(candidates, top_probs.log() - loss.view(q, k))


def top_answers(
    answer_ids: Tensor, probs: Tensor, answer_list: Sequence[str], n: int = 5,
) -> list[list[tuple[str, float]]]:
    """The n best answers of each question with their probabilities, from a ranking (Q, k) (best first).

    The probabilities are the softmax over the k candidates of the ranking, so they sum to at most 1.
    """
    n = min(n, answer_ids.size(1))
    return [[(answer_list[i], p) for i, p in zip(row_ids, row_probs)]
            for row_ids, row_probs in zip(answer_ids[:, :n].tolist(), probs[:, :n].tolist())]


@torch.no_grad()
def predict_answers(
    model: torch.nn.Module, dataset: Dataset, tokenizer: TextTokenizer, answers: TextBatch, device: torch.device,
    k: int, batch_size: int, max_tokens: int, top_n: int = 1, num_workers: int = 0, amp: str = "off",
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank the answer list for every question of ``dataset`` (items ``(image, question, item index)``).

    ``model.rank`` does the work; under ``torchrun`` each rank takes a contiguous share
    (``engine.distributed.shard_range``) and the shares are gathered in rank order, so every question is
    answered once. Returns, on every rank, item indices (n,), answer-list indices (n, top_n) and their
    probabilities (n, top_n), best first; questions whose image was unreadable are absent (n < len(dataset)).
    """
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(*distributed.shard_range(len(dataset))))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_none, pin_memory=device.type == "cuda")
    answer_ids, answer_atts = answers.input_ids.to(device), answers.attention_mask.to(device)
    top_n = min(top_n, k)
    indices, ids, probs = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, top_n, dtype=torch.long)], []
    for batch in loader:
        if len(batch) == 1:  # every image of the batch was unreadable
            continue
        image, questions, index, _ = batch
        text = tokenizer(questions, max_length=max_tokens).to(device, non_blocking=True)
        with _autocast(device, amp):
            ranked, p = model.rank(image.to(device, non_blocking=True), text.input_ids, text.attention_mask,
                                   answer_ids, answer_atts, k)
        indices.append(index)
        ids.append(ranked[:, :top_n].cpu())
        probs.append(p[:, :top_n].float().cpu())
    where = distributed.collective_device()
    gather = distributed.all_gather_uneven
    local_probs = torch.cat(probs) if probs else torch.zeros(0, top_n)
    return (gather(torch.cat(indices).to(where)).cpu(), gather(torch.cat(ids).to(where)).cpu(),
            gather(local_probs.to(where)).cpu())


def _autocast(device: torch.device, amp: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)
