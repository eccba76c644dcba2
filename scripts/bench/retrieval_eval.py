"""Section ``retrieval_eval``: ITM pairs reranked per second, batched evaluator against the official loop.

It measures the batched evaluator (``models.retrieval_eval.rerank_batched``) against the official
one-query-at-a-time loop (``rerank_per_query``) on the same model and random features, and whether their
rankings are identical. Sizes come from :data:`scripts.bench.inputs.RETRIEVAL_CONFIGS`.
"""

from __future__ import annotations

import argparse
import gc

import torch

from models import retrieval_eval, retrieval_reference
from models.model_retrieval import ALBEFRetrieval
from scripts.bench.common import Row, Section, logger, seed_everything
from scripts.bench.inputs import make_captions, retrieval_setup


@torch.no_grad()
def eval_features(model: ALBEFRetrieval, n_img: int, captions: int, max_tokens: int, device: torch.device,
                  seed: int, batch: int = 32) -> retrieval_eval.RetrievalFeatures:
    """Unimodal features of ``n_img`` random images and ``captions`` random captions per image."""
    gen = torch.Generator().manual_seed(seed)
    res = model.config.image_res
    ids, mask = make_captions(n_img * captions, max_tokens, seed)
    ids, mask = ids.to(device), mask.to(device)
    images = [model.encode_image(torch.randn(min(batch, n_img - a), 3, res, res, generator=gen).to(device))
              for a in range(0, n_img, batch)]
    texts = [model.encode_text(ids[a:a + 8 * batch], mask[a:a + 8 * batch]) for a in range(0, ids.size(0), 8 * batch)]
    return retrieval_eval.RetrievalFeatures(torch.cat([e for e, _ in images]), torch.cat([f for _, f in images]),
                                            torch.cat([e for e, _ in texts]), mask, torch.cat([f for _, f in texts]))


def _first_images(feats: retrieval_eval.RetrievalFeatures, n_img: int,
                  captions: int) -> retrieval_eval.RetrievalFeatures:
    """The features of the first ``n_img`` images and their captions (a warm-up problem)."""
    n_txt = n_img * captions
    return retrieval_eval.RetrievalFeatures(feats.image_embeds[:n_img], feats.image_feat[:n_img],
                                            feats.text_embeds[:n_txt], feats.text_atts[:n_txt],
                                            feats.text_feat[:n_txt])


@torch.no_grad()
def spread_weights(model: torch.nn.Module, std: float) -> None:
    """Redraw every weight matrix at ``std`` (0: no change), then re-copy the momentum twins.

    A freshly initialised small model scores all candidates of a query within about 0.01 of each other, so two
    evaluators that sum in different orders can swap candidates whose fp32 scores tie to 1e-8; spread weights
    give distinct scores (as a trained model does), so "identical rankings" tests the evaluator, not the ties.
    """
    if std <= 0:
        return
    for name, p in model.named_parameters():
        if p.dim() > 1 and "_m." not in name:
            p.normal_(0.0, std)
    model.copy_to_momentum()


def bench_retrieval_eval_size(size: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Batched against per-query ITM rerank of one size on the same random features (after a warm-up)."""
    config, model_config = retrieval_setup(size)
    n_img = getattr(args, f"eval_images_{size}")
    k_test = getattr(args, f"eval_k_{size}")
    k_test = config["k_test"] if k_test is None else k_test
    seed_everything(args.seed)
    model = ALBEFRetrieval(model_config).to(device).eval()
    spread_weights(model, getattr(args, f"eval_spread_{size}", 0.0))
    feats = eval_features(model, n_img, args.captions, config["max_tokens"], device, args.seed)
    warm = _first_images(feats, min(2, n_img), args.captions)
    retrieval_reference.benchmark_rerank(model, warm, k_test, args.rerank_batch)
    logger.info("retrieval_eval %s: %d images x %d captions, k_test %d", size, n_img, args.captions, k_test)
    stats = retrieval_reference.benchmark_rerank(model, feats, k_test, args.rerank_batch, repeats=args.eval_repeats)
    row: Row = {"size": size, "input": f"{model_config.image_res}px T{config['max_tokens']}", "images": n_img,
                "texts": n_img * args.captions, "k_test": k_test, "rerank_batch": args.rerank_batch}
    row.update(stats)
    del model, feats
    gc.collect()
    return row


def bench_retrieval_eval(args: argparse.Namespace) -> list[Row]:
    """ITM pairs reranked per second: batched evaluator against the official per-query loop, per size."""
    device = torch.device(args.device)
    return [bench_retrieval_eval_size(size, args, device) for size in args.sizes]


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--eval-*``, ``--captions``, ``--rerank-batch``."""
    parser.add_argument("--eval-images-tiny", type=int, default=300, help="images of retrieval_eval, tiny")
    parser.add_argument("--eval-images-full", type=int, default=8, help="images of retrieval_eval, full")
    parser.add_argument("--captions", type=int, default=5, help="captions per image in retrieval_eval")
    parser.add_argument("--eval-k-tiny", type=int, default=None, help="k_test of retrieval_eval, tiny (config's)")
    parser.add_argument("--eval-k-full", type=int, default=8, help="k_test of retrieval_eval, full")
    parser.add_argument("--eval-spread-tiny", type=float, default=0.3,
                        help="retrieval_eval, tiny: redraw weight matrices at this std (0: keep the init)")
    parser.add_argument("--eval-spread-full", type=float, default=0.0, help="the same for full")
    parser.add_argument("--rerank-batch", type=int, default=256, help="pairs per fusion batch of rerank_batched")
    parser.add_argument("--eval-repeats", type=int, default=3,
                        help="retrieval_eval: timed runs of each evaluator, alternating (median)")


def check(args: argparse.Namespace) -> str | None:
    """The error message when a count is below 1, or None."""
    counts = (args.eval_images_tiny, args.eval_images_full, args.captions, args.eval_k_full,
              1 if args.eval_k_tiny is None else args.eval_k_tiny, args.rerank_batch)
    if min(counts) < 1:
        return "--eval-*, --captions and --rerank-batch must be >= 1"
    return None


SECTION = Section(run=bench_retrieval_eval, add_args=add_args, check=check)
