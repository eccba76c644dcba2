"""Section ``vqa``: a VQA fine-tuning step, and answer ranking against the official-style re-implementation.

Rows of two kinds (column ``measure``), per ``--sizes`` entry; ``tiny`` is the toy VQA model
(``configs/toy/VQA.yaml``: 64 px ViT, 4-layer BERT, 2-layer answer decoder), ``full`` the official one
(``configs/VQA.yaml``: ViT-B/16 at 384 px, BERT-base, 6-layer answer decoder, momentum twins):

- ``train_step``: ``ALBEFVQA`` forward (answer likelihood with momentum distillation, momentum update inside)
  + backward + AdamW of the config, timed as the other step sections (:mod:`scripts.bench.step_timing`),
  batch ``--batch-full`` / ``--batch-tiny`` questions (on CPU the issue's figure is ``--batch-full 2``; on a
  GPU the official 32), :data:`ANSWERS_PER_QUESTION` answers each; bf16 autocast on CUDA.
- ``rank``: questions per second of ``models.vqa_rank.rank_answers`` against ``rank_answers_reference`` (the
  official ``rank_answer`` written plainly: question states repeated k times, every candidate projecting its
  question's cross-attention keys and values again) on the same model and the same fused question states,
  ``--vqa-k`` candidates out of a generated ``--vqa-answers`` answer list (random word pieces, lengths drawn
  from :data:`ANSWER_PIECES`), ``--vqa-rank-batch`` questions per call as ``batch_size_test``; fp32 on
  every device. The two run ``--vqa-repeats`` times each, alternating, after an untimed warm-up on two
  questions; the rates come from the median wall time (``cpu_speedup`` from CPU seconds, steadier on a
  shared machine). ``identical_answers``: the same best answer for every question; ``identical_rankings``:
  the same k candidates in the same order; ``max_prob_diff``: the largest difference of a candidate's
  probability between the two; ``encode_q_per_s``: the image encoder + BERT fusion that make the states
  (not timed in the rates); ``*_extra_mb``: peak memory above the resident model during a run (RSS on CPU).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import VQA
from engine.config import load_config
from models.albef import ALBEFConfig
from models.model_vqa import ALBEFVQA
from models.vqa_rank import rank_answers, rank_answers_reference
from optim import create_optimizer
from scripts.bench.common import REPO_ROOT, Row, Section, logger, peak_memory_mb, reset_peak_memory, seed_everything
from scripts.bench.inputs import SIZES, make_captions, make_inputs
from scripts.bench.step_timing import run_interleaved, step_row, train_step_fn

VQA_CONFIGS = {"tiny": "configs/toy/VQA.yaml", "full": "configs/VQA.yaml"}
CLS, SEP, FIRST_WORD, VOCAB_END = 101, 102, 1000, 30000  # random word pieces avoid [unused*] and specials
# Share of answers by word-piece count (without [CLS] and [SEP]): an estimate for VQA v2's 3,128 most frequent
# answers, mostly one word ("yes", "2", "white"), some two or three ("black and white", "cell phone").
ANSWER_PIECES = {1: 0.55, 2: 0.28, 3: 0.11, 4: 0.04, 5: 0.015, 6: 0.005}
QUESTION_TOKENS = (6, 14)  # VQA v2 questions: about 6 words; [CLS] included
ANSWERS_PER_QUESTION = 3  # distinct annotator answers of a training question, weighted by their share
ANSWER_WEIGHTS = (0.6, 0.3, 0.1)


def vqa_setup(size: str) -> tuple[dict, ALBEFConfig]:
    """The resolved VQA config of ``size`` (:data:`VQA_CONFIGS`) and its model config."""
    config = load_config(str(REPO_ROOT / VQA_CONFIGS[size]), VQA.DEFAULTS)
    return config, ALBEFConfig.from_config(config, str(REPO_ROOT / config["bert_config"]))


def make_answer_list(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` tokenised answers ``[CLS] w.. [SEP] [PAD]..`` (n, T) and their masks, T the longest, of random
    word pieces with counts drawn from :data:`ANSWER_PIECES`."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(list(ANSWER_PIECES))
    pieces = counts[torch.multinomial(torch.tensor(list(ANSWER_PIECES.values())), n, True, generator=gen)]  # (n,)
    width = int(pieces.max()) + 2
    ids = torch.randint(FIRST_WORD, VOCAB_END, (n, width), generator=gen)
    pos = torch.arange(width)[None]
    ids[:, 0] = CLS
    ids = torch.where(pos == pieces[:, None] + 1, SEP, ids)
    atts = (pos <= pieces[:, None] + 1).long()
    return ids * atts, atts


def make_questions(n: int, max_tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random questions of :data:`QUESTION_TOKENS` tokens, padded to the longest (as the tokenizer)."""
    ids, atts = make_captions(n, max_tokens, seed, tokens=QUESTION_TOKENS)
    width = int(atts.sum(dim=1).max())
    return ids[:, :width], atts[:, :width]


def bench_step(size: str, model: ALBEFVQA, config: dict, args: argparse.Namespace, device: torch.device) -> Row:
    """One size's fine-tuning step: forward (distillation, momentum update) + backward + AdamW."""
    batch = getattr(args, SIZES[size][2])
    model.train()
    image, _, _ = make_inputs(batch, model.config.image_res, 1, device, args.seed)
    q_ids, q_atts = (t.to(device) for t in make_questions(batch, config["max_tokens"], args.seed))
    answer_list = make_answer_list(args.vqa_answers, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, args.vqa_answers, (batch * ANSWERS_PER_QUESTION,), generator=gen)  # (N,)
    a_atts = answer_list[1][rows]
    width = int(a_atts.sum(dim=1).max())
    a_ids, a_atts = answer_list[0][rows, :width].to(device), a_atts[:, :width].to(device)
    counts = torch.full((batch,), ANSWERS_PER_QUESTION, dtype=torch.long, device=device)
    weights = torch.tensor(ANSWER_WEIGHTS, device=device).repeat(batch)
    optimizer = create_optimizer(config["optimizer"], model)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    alpha = args.alpha if config["distill"] else 0.0

    def forward() -> dict[str, Tensor]:
        return model(image, q_ids, q_atts, a_ids, a_atts, counts, weights, alpha=alpha)

    step = train_step_fn(forward, optimizer, device.type, amp_dtype)
    logger.info("vqa train_step %s: batch %d x %d answers, %s, %.1fM parameters", size, batch, ANSWERS_PER_QUESTION,
                device, sum(p.numel() for p in model.parameters()) / 1e6)
    results = run_interleaved({"ours": step}, args.steps, args.warmup, device)
    results["ours"]["peak_mb"] = results["ours"]["process_peak_mb"]
    row = step_row(size, batch, model.config, q_ids.size(1), results)
    row["input"] = f"{model.config.image_res}px Tq{q_ids.size(1)} A{a_ids.size(0)}xT{width}"
    row["precision"] = "bf16-autocast" if amp_dtype else "fp32"
    del optimizer
    return {"measure": "train_step", **row}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], Any]], repeats: int,
                     device: torch.device) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Run each function ``repeats`` times, alternating their order; per function the wall and CPU seconds
    and the peak memory above the start of each run (MiB), and each function's last output."""
    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "extra_mb": []} for name in fns}
    outputs: dict[str, Any] = {}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            _sync(device)
            base = reset_peak_memory(device)
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fns[name]()
            _sync(device)
            runs[name]["wall"].append(time.perf_counter() - t0)
            runs[name]["cpu"].append(time.process_time() - c0)
            runs[name]["extra_mb"].append(peak_memory_mb(device) - base)
            logger.info("  %-9s run %d: %.2f s wall, %.2f s CPU", name, i, runs[name]["wall"][-1],
                        runs[name]["cpu"][-1])
    return runs, outputs


def compare_rankings(fast: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], num_answers: int) -> Row:
    """Best answers and whole rankings equal?, and the largest difference of one answer's probability
    (an answer missing from one ranking counts with probability 0 there)."""
    (fast_ids, fast_p), (ref_ids, ref_p) = fast, ref
    dense = [torch.zeros(ids.size(0), num_answers, dtype=p.dtype, device=p.device).scatter(1, ids, p)
             for ids, p in ((fast_ids, fast_p), (ref_ids, ref_p))]
    return {"identical_answers": bool(torch.equal(fast_ids[:, 0], ref_ids[:, 0])),
            "identical_rankings": bool(torch.equal(fast_ids, ref_ids)),
            "differing_answers": int((fast_ids[:, 0] != ref_ids[:, 0]).sum()),
            "max_prob_diff": float((dense[0] - dense[1]).abs().max())}


@torch.no_grad()
def question_states(model: ALBEFVQA, n: int, config: dict, args: argparse.Namespace,
                    device: torch.device) -> tuple[Tensor, Tensor, float]:
    """Fused states (n, S, H) and masks (n, S) of ``n`` random images and questions, and the seconds taken."""
    image, _, _ = make_inputs(n, model.config.image_res, 1, device, args.seed + 1)
    ids, atts = (t.to(device) for t in make_questions(n, config["max_tokens"], args.seed + 1))
    _sync(device)
    t0 = time.perf_counter()
    states = torch.cat([model.encode_question(image[a:a + args.vqa_rank_batch], ids[a:a + args.vqa_rank_batch],
                                              atts[a:a + args.vqa_rank_batch])
                        for a in range(0, n, args.vqa_rank_batch)])
    _sync(device)
    return states, atts, time.perf_counter() - t0


def bench_rank(size: str, model: ALBEFVQA, config: dict, args: argparse.Namespace, device: torch.device) -> Row:
    """Questions per second of the batched ranking against the official-style one, same model and states."""
    n, k, batch = getattr(args, f"vqa_questions_{size}"), args.vqa_k, args.vqa_rank_batch
    model.eval()
    states, atts, encode_s = question_states(model, n, config, args, device)
    a_ids, a_atts = (t.to(device) for t in make_answer_list(args.vqa_answers, args.seed))

    def ranker(fn: Callable) -> Callable[[int], tuple[Tensor, Tensor]]:
        def run(count: int = n) -> tuple[Tensor, Tensor]:
            parts = [fn(model.text_decoder, states[a:min(a + batch, count)], atts[a:min(a + batch, count)], a_ids,
                        a_atts, k, model.pad_token_id) for a in range(0, count, batch)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return run

    fast, ref = ranker(rank_answers), ranker(rank_answers_reference)
    fast(min(2, n)), ref(min(2, n))  # warm-up
    logger.info("vqa rank %s: %d questions, %d answers (T%d), k %d, %d per call", size, n, args.vqa_answers,
                a_ids.size(1), k, batch)
    runs, out = time_alternating({"fast": fast, "ref": ref}, args.vqa_repeats, device)
    wall = {name: statistics.median(r["wall"]) for name, r in runs.items()}
    cpu = {name: statistics.median(r["cpu"]) for name, r in runs.items()}
    row: Row = {"measure": "rank", "size": size, "input": f"{model.config.image_res}px Tq{atts.size(1)}",
                "questions": n, "answers": args.vqa_answers, "k_test": k, "rank_batch": batch,
                "fast_q_per_s": n / wall["fast"], "ref_q_per_s": n / wall["ref"],
                "speedup": wall["ref"] / wall["fast"]}
    if device.type == "cpu":
        row["cpu_speedup"] = cpu["ref"] / cpu["fast"]
    row.update(compare_rankings(out["fast"], out["ref"], args.vqa_answers))
    row.update(encode_q_per_s=n / encode_s, fast_extra_mb=max(runs["fast"]["extra_mb"]),
               ref_extra_mb=max(runs["ref"]["extra_mb"]))
    row.update({f"{name}_{kind}_runs_s": r[kind] for name, r in runs.items() for kind in ("wall", "cpu")})
    return row


def bench_vqa(args: argparse.Namespace) -> list[Row]:
    """Per size: the ranking comparison, then the training step, on one model (fresh weights)."""
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        config, model_config = vqa_setup(size)
        seed_everything(args.seed)
        model = ALBEFVQA(model_config, decoder_layers=config["decoder_layers"] or None).to(device)
        rows.append(bench_rank(size, model, config, args, device))
        rows.append(bench_step(size, model, config, args, device))
        del model
        gc.collect()  # the model of one size is gone before the next is built
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--vqa-*``."""
    parser.add_argument("--vqa-questions-tiny", type=int, default=16, help="vqa rank: questions, tiny")
    parser.add_argument("--vqa-questions-full", type=int, default=8, help="vqa rank: questions, full")
    parser.add_argument("--vqa-answers", type=int, default=3128, help="vqa: answer-list size (official 3,128)")
    parser.add_argument("--vqa-k", type=int, default=128, help="vqa rank: candidates per question (k_test)")
    parser.add_argument("--vqa-rank-batch", type=int, default=16, help="vqa rank: questions per call (batch_size_test)")
    parser.add_argument("--vqa-repeats", type=int, default=2, help="vqa rank: timed runs of each, alternating")


def check(args: argparse.Namespace) -> str | None:
    """The error message when a count is below 1 or k exceeds the answer list, or None."""
    counts = (args.vqa_questions_tiny, args.vqa_questions_full, args.vqa_answers, args.vqa_k, args.vqa_rank_batch,
              args.vqa_repeats)
    if min(counts) < 1:
        return "--vqa-* counts must be >= 1"
    if args.vqa_k > args.vqa_answers:
        return f"--vqa-k {args.vqa_k} exceeds --vqa-answers {args.vqa_answers}"
    return None


SECTION = Section(run=bench_vqa, add_args=add_args, check=check)
