"""Losses, hard-negative sampling and MLM masking against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import (
    itc_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    positive_targets,
    sample_negatives,
    soft_cross_entropy,
    soft_targets,
)


def test_soft_targets_mix_momentum_softmax_and_ground_truth() -> None:
    sim_m = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [0.25, 0.75]
    hard = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(soft_targets(sim_m, hard, 0.4), torch.tensor([[0.7, 0.3]]))


def test_itc_loss_hand_computed() -> None:
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    eye = torch.eye(2)
    expected = math.log(1 + math.exp(-1))  # -log(e / (e + 1)) for each row and direction
    assert itc_loss(sim, sim, eye, eye).item() == pytest.approx(expected, rel=1e-6)
    # soft targets: row [0.7, 0.3] against log-softmax of [1, 0]
    t = torch.tensor([[0.7, 0.3]])
    lse = math.log(math.e + 1)
    assert soft_cross_entropy(torch.tensor([[1.0, 0.0]]), t).item() == pytest.approx(
        -(0.7 * (1 - lse) + 0.3 * (0 - lse)), rel=1e-6)


def test_positive_targets_share_mass_between_same_image_entries() -> None:
    pos = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(positive_targets(pos), torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))


def test_mlm_loss_with_distillation_hand_computed() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    labels = torch.tensor([1])
    ce = -math.log(0.75)
    assert mlm_loss(logits, labels).item() == pytest.approx(ce, rel=1e-6)
    soft = torch.tensor([[0.5, 0.5]])
    distill = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert mlm_loss(logits, labels, soft, 0.5).item() == pytest.approx(0.5 * ce + 0.5 * distill, rel=1e-6)


def test_mlm_loss_without_masked_tokens_is_zero_not_nan() -> None:
    logits = torch.zeros(0, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, 7), 0.4)
    assert loss.item() == 0.0
    loss.backward()


def test_itm_loss_weights_drop_pairs() -> None:
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]])
    labels = torch.tensor([1, 1, 0])
    assert itm_loss(logits, labels, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert itm_loss(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item())


def test_sample_negatives_never_returns_a_positive() -> None:
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 5, generator=gen)
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 3] = pos[3, 0] = True  # items 0 and 3 show the same image
    for _ in range(200):
        idx, valid = sample_negatives(sim, pos, gen)
        assert valid.all()
        assert not pos[torch.arange(5), idx].any()


def test_sample_negatives_follows_the_softmax_of_the_other_columns() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.tensor([[5.0, 0.0, math.log(3.0)]]).repeat(20000, 1)
    pos = torch.zeros(20000, 3, dtype=torch.bool)
    pos[:, 0] = True
    idx, _ = sample_negatives(sim, pos, gen)
    assert (idx == 2).float().mean().item() == pytest.approx(0.75, abs=0.015)  # 3 / (1 + 3)


def test_sample_negatives_batch_of_one_and_all_same_image() -> None:
    idx, valid = sample_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert idx.tolist() == [0] and valid.tolist() == [False]
    idx, valid = sample_negatives(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert not valid.any()


def test_sample_negatives_survive_nan_and_extreme_temperature() -> None:
    sim = torch.tensor([[float("nan")] * 3, [0.0, 1.0, float("inf")], [1000.0, -1000.0, 1000.0]])
    pos = torch.eye(3, dtype=torch.bool)
    idx, valid = sample_negatives(sim, pos)
    assert valid.all()
    assert not pos[torch.arange(3), idx].any()
    assert idx[1].item() == 0  # inf is not finite -> only column 0 is allowed
    # sim / temp at the clamp floor: off-diagonal weights of a plain softmax underflow to 0
    sharp = torch.eye(4) * 1000.0 - 1000.0
    idx, valid = sample_negatives(sharp, torch.eye(4, dtype=torch.bool))
    assert valid.all() and not (idx == torch.arange(4)).any()


def test_mask_tokens_rules_and_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (400, 50), generator=gen)
    ids[:, 0] = 101  # [CLS]
    ids[:, 40:] = 0  # [PAD]
    masked, labels = mask_tokens(ids, 30522, 103, (0, 101), 0.15, gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen[:, 1:40].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = chosen.sum().item()
    frac_mask = (masked[chosen] == 103).sum().item() / n
    frac_same = (masked[chosen] == ids[chosen]).sum().item() / n
    assert frac_mask == pytest.approx(0.8, abs=0.02)
    assert frac_same == pytest.approx(0.1, abs=0.02)
    assert torch.equal(ids[:, 0], torch.full((400,), 101))  # input untouched
