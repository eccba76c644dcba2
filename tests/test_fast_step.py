"""The fast pre-training step equals the official algorithm (scripts/reference_step.py) on the same draws.

The fast ``ALBEFPretrain.forward`` draws its MLM mask and hard negatives itself; the tests record those
draws (by wrapping ``mask_tokens`` and ``sample_negatives``) and replay them in ``reference_forward`` on a
deep copy of the model. Losses, gradients, momentum weights and queues must agree, also with gradient
checkpointing on.
"""

from __future__ import annotations

import copy
import functools
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import models.albef
import models.model_pretrain
from conftest import tiny_albef, tiny_bert
from engine import epochs, trainer
from models.model_pretrain import ALBEFPretrain
from optim import create_optimizer
from scripts.reference_step import _draw_negatives, bert_forward, reference_forward, reference_train_step, vit_forward

ALPHA = 0.4
Batch = tuple[Tensor, Tensor, Tensor]


def make_model(**kw: Any) -> ALBEFPretrain:
    """Tiny pre-training model with every dropout off (queue 12 = 3 batches of 4)."""
    bert = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ALBEFPretrain(tiny_albef(bert=bert, mlm_probability=0.5, **kw))
    return model.train()


def make_batch(bs: int = 4, seq: int = 8, res: int = 32) -> Batch:
    ids = torch.randint(1000, 3000, (bs, seq))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0
    ids[1, 6:], mask[1, 6:] = 0, 0
    return torch.randn(bs, 3, res, res), ids, mask


class DrawRecorder:
    """Wraps the fast step's random draws and records their outputs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masks: list[tuple[Tensor, Tensor]] = []
        self.negatives: list[tuple[Tensor, Tensor]] = []
        monkeypatch.setattr(models.model_pretrain, "mask_tokens", self._wrap(models.model_pretrain.mask_tokens,
                                                                             self.masks))
        monkeypatch.setattr(models.albef, "sample_negatives", self._wrap(models.albef.sample_negatives,
                                                                         self.negatives))

    @staticmethod
    def _wrap(fn: Callable, store: list) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            store.append(out)
            return out
        return wrapper

    def draws(self) -> dict[str, Any]:
        """The draws of the last step, as ``reference_forward`` keyword arguments."""
        (neg_image, valid_image), (neg_text, valid_text) = self.negatives[-2:]
        assert valid_image.all() and valid_text.all()
        masked_ids, labels = self.masks[-1]
        assert (labels != -100).any(), "the test batch must have masked tokens"
        return {"neg_image_idx": neg_image, "neg_text_idx": neg_text, "mlm_mask": (masked_ids, labels)}


def flat(draws: dict[str, Any]) -> list[Tensor]:
    """The draw tensors in a fixed order."""
    return [draws["neg_image_idx"], draws["neg_text_idx"], *draws["mlm_mask"]]


def fast_step(model: ALBEFPretrain, batch: Batch, alpha: float = ALPHA) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    losses = model(*batch, alpha=alpha)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def reference_step(
    model: ALBEFPretrain, batch: Batch, draws: dict[str, Any], alpha: float = ALPHA,
) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    losses = reference_forward(model, *batch, alpha, **draws)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def assert_losses_equal(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def assert_grads_equal(a: torch.nn.Module, b: torch.nn.Module, rel: float = 1e-5) -> None:
    """Every trainable gradient agrees to ``rel`` times its own scale (max |g|); measured: <= 4e-6.

    Gradients that are analytically zero (e.g. the attention key bias) are noise of order 1e-11.
    """
    grads_b = dict(b.named_parameters())
    checked = 0
    for name, p in a.named_parameters():
        if not p.requires_grad:
            continue
        g_a, g_b = p.grad, grads_b[name].grad
        assert g_a is not None and g_b is not None, name
        atol = max(rel * g_b.abs().max().item(), 1e-9)  # floor: gradients that are 0 up to rounding
        torch.testing.assert_close(g_a, g_b, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked > 50


def assert_state_equal(a: ALBEFPretrain, b: ALBEFPretrain) -> None:
    """Momentum weights and queues equal (the EMA differs only in rounding: lerp vs. m*p_m + (1-m)*p)."""
    params_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, params_b[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(a.image_queue, b.image_queue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.text_queue, b.text_queue, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.queue_ptr, b.queue_ptr)


@pytest.mark.parametrize("alpha", [ALPHA, 0.0])
def test_fast_step_equals_reference(monkeypatch: pytest.MonkeyPatch, alpha: float) -> None:
    """Two consecutive steps (the second reads the queue the first wrote): same losses, grads, state."""
    fast = make_model()
    ref = copy.deepcopy(fast)
    recorder = DrawRecorder(monkeypatch)
    for _ in range(2):
        batch = make_batch()
        out_fast = fast_step(fast, batch, alpha)
        out_ref = reference_step(ref, batch, recorder.draws(), alpha)
        assert_losses_equal(out_fast, out_ref)
        assert_grads_equal(fast, ref)
        assert_state_equal(fast, ref)
    assert int(fast.queue_ptr) == 8


def test_fast_step_equals_reference_with_grad_ckpt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient checkpointing (BERT and ViT) changes neither losses nor gradients (bitwise), and the
    checkpointed step still equals the reference."""
    plain = make_model()
    ckpt = copy.deepcopy(plain)
    ref = copy.deepcopy(plain)
    ckpt.bert.encoder.grad_ckpt = True
    ckpt.visual_encoder.set_grad_checkpointing(True)
    batch = make_batch()
    recorder = DrawRecorder(monkeypatch)
    torch.manual_seed(1)
    out_plain = fast_step(plain, batch)
    draws = recorder.draws()
    torch.manual_seed(1)
    out_ckpt = fast_step(ckpt, batch)
    assert all(torch.equal(x, y) for x, y in zip(flat(draws), flat(recorder.draws())))  # same random draws
    assert all(torch.equal(out_ckpt[k], out_plain[k]) for k in out_plain)  # bitwise: same ops recomputed
    grads_plain = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert all(torch.equal(p.grad, grads_plain[n]) for n, p in ckpt.named_parameters() if p.requires_grad)
    out_ref = reference_step(ref, batch, draws)
    assert_losses_equal(out_ckpt, out_ref)
    assert_grads_equal(ckpt, ref)


def test_grad_ckpt_config_flag_reaches_both_encoders() -> None:
    model = ALBEFPretrain(tiny_albef(grad_ckpt=True))
    assert model.bert.encoder.grad_ckpt
    assert model.visual_encoder.grad_checkpointing


def test_reference_draws_its_own_negatives_and_mask() -> None:
    """Without given draws the reference samples as the official code (never the positive itself)."""
    model = make_model()
    batch = make_batch()
    out = reference_forward(model, *batch, ALPHA)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    assert int(model.queue_ptr) == 4
    weights = torch.softmax(torch.randn(4, 4), dim=1).fill_diagonal_(0)
    for _ in range(20):
        assert all(i != b for b, i in enumerate(_draw_negatives(weights, None)))


def test_manual_attention_encoders_match_the_modules() -> None:
    """The reference's explicit-attention ViT and BERT equal the model's SDPA modules."""
    model = make_model()
    image, ids, mask = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(vit_forward(model.visual_encoder, image), model.visual_encoder(image))
        text = bert_forward(model.bert, mask, "text", input_ids=ids)
        torch.testing.assert_close(text, model.bert.encode_text(ids, mask))
        image_embeds = model.visual_encoder(image)
        torch.testing.assert_close(bert_forward(model.bert, mask, "fusion", embeds=text, image=image_embeds),
                                   model.bert.fuse(text, mask, image_embeds))


def test_reference_train_step_updates_weights() -> None:
    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.text_proj.weight.detach().clone()
    before_m = model.text_proj_m.weight.detach().clone()
    out = reference_train_step(model, optimizer, make_batch(), ALPHA)
    assert set(out) == {"loss_mlm", "loss_ita", "loss_itm"}
    assert not torch.equal(before, model.text_proj.weight)
    # the first EMA averages identical weights: unchanged up to rounding
    torch.testing.assert_close(before_m, model.text_proj_m.weight.detach(), rtol=0, atol=1e-7)
    reference_train_step(model, optimizer, make_batch(), ALPHA)
    assert (before_m - model.text_proj_m.weight).abs().max() > 1e-6


def test_fast_train_step_needs_no_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default step never calls ``torch.compile`` (it is optional, off by default)."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.compile must not be required")

    monkeypatch.setattr(torch, "compile", forbidden)
    model = make_model()
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    out = fast_step(model, make_batch())
    optimizer.step()
    assert all(torch.isfinite(v) for v in out.values())


def test_compiled_step_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile: true`` (``trainer.wrap_model`` -> ``torch.compile``): the reference's losses, gradients and state.

    Inductor generates C++ for the CPU (about 2.5 min here); without a C++ compiler on the PATH the graphs are
    still captured and differentiated by TorchDynamo and AOTAutograd (backend ``aot_eager``), uncompiled.
    """
    fast = make_model()
    ref = copy.deepcopy(fast)
    recorder = DrawRecorder(monkeypatch)
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    compiled = trainer.wrap_model(fast, {"compile": True}, torch.device("cpu"))
    assert compiled is not fast and epochs.unwrap(compiled) is fast
    try:
        batch = make_batch()
        out = fast_step(compiled, batch)
        out_ref = reference_step(ref, batch, recorder.draws())
    finally:
        torch._dynamo.reset()
    assert_losses_equal(out, out_ref)
    assert_grads_equal(fast, ref)
    assert_state_equal(fast, ref)
