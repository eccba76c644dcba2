"""ALBEF objectives as pure functions on tensors (paper Sec. 3.2-3.3, eqs. 1-7).

Each is small enough to check against a hand computation (see tests/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_targets(sim_m: Tensor, hard: Tensor, alpha: float) -> Tensor:
    """Momentum-distillation targets (eq. 6): ``alpha * softmax(sim_m) + (1 - alpha) * hard``.

    sim_m: (B, K) similarities of the momentum model; hard: (B, K) ground truth rows summing to 1.
    """
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * hard


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_k targets * log_softmax(logits)``; logits, targets (B, K)."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """Image-text contrastive loss (eq. 2 with soft targets, eq. 6): mean of both directions.

    sim_i2t: (B, B + Q) image vs. [batch texts, queue]; sim_t2i: (B, B + Q) text vs. images.
    """
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def positive_targets(positive: Tensor) -> Tensor:
    """(B, K) boolean positives -> rows normalised to sum 1 (1/#positives per positive)."""
    positive = positive.float()
    return positive / positive.sum(dim=1, keepdim=True).clamp_min(1.0)


def sample_negatives(sim: Tensor, positive: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per row from ``softmax(sim)`` restricted to non-positive columns.

    sim: (B, B) in-batch similarities (any dtype); positive: (B, B) bool, True where the pair matches
    (the diagonal, and entries sharing an image id). One ``torch.multinomial`` for all rows, no host sync.
    Non-finite similarities get zero weight. Rows without any valid negative (batch size 1, every
    other item the same image, or all similarities non-finite) draw uniformly from the non-positive
    columns, or return their own index, and are flagged invalid so the caller can drop them.

    Returns (indices (B,) long, valid (B,) bool).
    """
    sim = sim.detach().float()
    allowed = ~positive & torch.isfinite(sim)
    logits = sim.masked_fill(~allowed, float("-inf"))
    # Softmax over the allowed entries only: normalising by their own maximum means the best
    # negative always has weight >= 1/B, so nothing underflows to an all-zero row (temp 0.001, fp16).
    row_max = logits.amax(dim=1, keepdim=True).clamp_min(torch.finfo(sim.dtype).min)
    weights = torch.exp(logits - row_max)  # 0 where not allowed
    has_negative = allowed.any(dim=1)
    non_positive = (~positive).float()
    fallback = torch.where(non_positive.sum(dim=1, keepdim=True) > 0, non_positive, torch.ones_like(non_positive))
    weights = torch.where(has_negative[:, None], weights, fallback)
    idx = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    valid = ~positive.gather(1, idx[:, None]).squeeze(1)
    return idx, valid


def itm_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Image-text matching cross-entropy (eq. 3); logits (N, 2), labels (N,), weight (N,) in {0, 1}.

    With all weights 1 this is the plain mean, as in the official code; weight 0 drops pairs whose
    "negative" could not be drawn (see :func:`sample_negatives`).
    """
    if weight is None:
        return F.cross_entropy(logits, labels)
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    return (per_pair * weight).sum() / weight.sum().clamp_min(1.0)


def mlm_loss(logits: Tensor, labels: Tensor, soft_labels: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Masked language modelling with momentum distillation (eq. 7) at the M masked positions.

    logits (M, V), labels (M,), soft_labels (M, V) the momentum model's softmax. Returns
    ``(1 - alpha) * CE + alpha * mean(-sum soft * log_softmax)``; 0 (with a gradient path) when M == 0,
    where the official code returns NaN.
    """
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits, labels)
    if soft_labels is not None and alpha > 0:
        distill = -(F.log_softmax(logits, dim=-1) * soft_labels).sum(dim=-1).mean()
        loss = (1.0 - alpha) * loss + alpha * distill
    return loss


def distill_cross_entropy(
    logits: Tensor, targets: Tensor, logits_m: Tensor | None = None, alpha: float = 0.0,
) -> Tensor:
    """Classification with momentum distillation (SNLI-VE, NLVR2; official ``model_ve.py``/``model_nlvr.py``).

    logits (B, C), targets (B,) class indices, logits_m (B, C) of the momentum model. Returns
    ``(1 - alpha) * CE(logits, targets) + alpha * mean(-sum softmax(logits_m) * log_softmax(logits))``;
    plain CE when ``logits_m`` is None (``distill: false``).
    """
    loss = F.cross_entropy(logits, targets)
    if logits_m is None:
        return loss
    return (1.0 - alpha) * loss + alpha * soft_cross_entropy(logits, F.softmax(logits_m, dim=1))


def mask_tokens(
    input_ids: Tensor, vocab_size: int, mask_token_id: int, special_ids: tuple[int, ...],
    probability: float = 0.15, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking as ALBEF: choose tokens with ``probability`` (never the ``special_ids``, e.g.
    [PAD], [CLS]); of those 80% become [MASK], 10% a random token of the whole vocabulary, 10% stay.

    input_ids (B, T) -> (masked ids (B, T), labels (B, T) with -100 where not chosen). Input unchanged.
    """
    device = input_ids.device

    def bernoulli(p: float) -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device) < p

    chosen = bernoulli(probability)
    for token in special_ids:
        chosen &= input_ids != token
    labels = input_ids.masked_fill(~chosen, -100)
    to_mask = bernoulli(0.8) & chosen
    to_random = bernoulli(0.5) & chosen & ~to_mask
    random_words = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_words, masked)
    return masked, labels
