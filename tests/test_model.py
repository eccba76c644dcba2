"""Model core: tiny forward/backward, EMA, queue ring buffer, ITM sampling wiring, checkpoint manifests."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_albef
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights
from models.model_pretrain import ALBEFPretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Key/shape manifests of the released checkpoints (ALBEF.pth, mscoco.pth, vqa.pth, NLVR2): the compatibility contract.
MANIFESTS = os.path.join(ROOT, "tests", "data")


def read_manifest(name: str) -> list[tuple[str, list[int], str, str | None]]:
    rows = []
    with open(os.path.join(MANIFESTS, name), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            shape = [int(x) for x in parts[1].strip("[]").split(",") if x.strip()]
            tied = parts[3].removeprefix("tied_to=") if len(parts) > 3 else None
            rows.append((parts[0], shape, parts[2], tied))
    return rows


def state_from_manifest(rows: list) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state: dict[str, torch.Tensor] = {}
    for i, (key, shape, dtype, tied) in enumerate(rows):
        state[key] = state[tied] if tied else torch.full(shape, float(i % 7), dtype=dtypes[dtype])
    return state


def batch(bs: int = 4, res: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 3000, (bs, 7))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    ids[0, 5:] = 0
    mask[0, 5:] = 0
    return torch.randn(bs, 3, res, res), ids, mask


@pytest.mark.parametrize("bs", [1, 2, 5])
def test_pretrain_forward_backward(bs: int) -> None:
    model = ALBEFPretrain(tiny_albef())
    image, ids, mask = batch(bs)
    out = model(image, ids, mask, alpha=0.4)
    assert set(out) == {"loss_ita", "loss_itm", "loss_mlm"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    sum(out.values()).backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.temp.grad is not None
    assert all(p.grad is None for p in model.visual_encoder_m.parameters())


def test_temperature_is_clamped() -> None:
    model = ALBEFPretrain(tiny_albef())
    with torch.no_grad():
        model.temp.fill_(1e-5)
    model(*batch(), alpha=0.0)
    assert model.temp.item() == pytest.approx(0.001)


def test_momentum_update_is_an_in_place_ema() -> None:
    model = ALBEFPretrain(tiny_albef(momentum=0.9))
    p, p_m = model.vision_proj.weight, model.vision_proj_m.weight
    storage = p_m.data_ptr()
    with torch.no_grad():
        p.fill_(1.0)
        p_m.fill_(0.0)
    model.momentum_update()
    assert torch.allclose(p_m, torch.full_like(p_m, 0.1))
    assert p_m.data_ptr() == storage
    # the tied decoder weight of the momentum MLM head follows its embedding
    twin = model.text_encoder_m
    assert twin.cls.predictions.decoder.weight is twin.bert.embeddings.word_embeddings.weight


def test_queue_is_a_ring_buffer_for_any_batch_size() -> None:
    model = ALBEFPretrain(tiny_albef(queue_size=5, embed_dim=2))
    a = torch.arange(6, dtype=torch.float).view(3, 2)
    b = torch.arange(100, 106, dtype=torch.float).view(3, 2)
    model.enqueue(a, -a)
    assert model.queue_ptr.item() == 3
    model.enqueue(b, -b)  # columns 3, 4 and then 0 (wrap-around)
    assert model.queue_ptr.item() == 1
    q = model.image_queue
    assert torch.equal(q[:, 3], b[0]) and torch.equal(q[:, 4], b[1]) and torch.equal(q[:, 0], b[2])
    assert torch.equal(q[:, 1], a[1]) and torch.equal(model.text_queue[:, 0], -b[2])
    big = torch.arange(14, dtype=torch.float).view(7, 2)
    model.enqueue(big, big)  # larger than the queue: the last 5 rows stay
    assert model.queue_ptr.item() == 1
    assert sorted(q[0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]


def test_contrastive_targets_at_alpha_zero_are_the_diagonal() -> None:
    model = ALBEFPretrain(tiny_albef())
    feats = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    loss, sim_i2t, sim_t2i = model.contrastive(feats, feats, feats, feats, alpha=0.0)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(sim_i2t, torch.arange(3)) + ce(sim_t2i, torch.arange(3))) / 2  # one-hot targets
    assert sim_i2t.shape == (3, 3 + 12)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_itc_warmup_uses_the_batch_only_and_trains_itc_alone() -> None:
    model = ALBEFPretrain(tiny_albef(queue_size=6, momentum=0.0)).eval()  # eval: no dropout
    image, ids, mask = batch(3)
    queue_before = model.image_queue.clone()
    model(image, ids, mask, alpha=0.0)
    warm = model(image, ids, mask, alpha=0.0, itc_warmup=True)
    # the queue was still filled by both calls: 3 + 3 columns overwrite all of the 6 random ones
    assert model.queue_ptr.item() == 0 and not torch.isclose(model.image_queue, queue_before).any()
    # momentum 0: the momentum features are the online ones, so the in-batch loss is a plain CLIP loss
    image_feat = model.encode_image(image)[1]
    text_feat = model.encode_text(ids, mask)[1]
    sim = image_feat @ text_feat.t() / model.temp
    clip = (F.cross_entropy(sim, torch.arange(3)) + F.cross_entropy(sim.t(), torch.arange(3))) / 2
    assert list(warm) == ["loss_ita"]
    assert warm["loss_ita"].item() == pytest.approx(clip.item(), rel=1e-5)
    model.zero_grad(set_to_none=True)
    warm["loss_ita"].backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # ITM and MLM are skipped: the ITM head and the fusion layers get no gradient at all
    fusion = model.bert.encoder.layer[model.config.bert.fusion_layer]
    assert model.itm_head.weight.grad is None and fusion.crossattention.self.key.weight.grad is None


def test_fusion_on_gathered_image_keys_values_equals_fusion_on_gathered_image_tokens() -> None:
    model = ALBEFPretrain(tiny_albef()).eval()
    image, ids, mask = batch(3)
    image_embeds = model.encode_image(image)[0]  # (3, S, D)
    text_embeds = model.encode_text(ids, mask)[0]
    pairs = torch.tensor([2, 0, 2])  # one image used twice, one not at all
    kv = [(k.index_select(0, pairs), v.index_select(0, pairs)) for k, v in model.bert.image_keys_values(image_embeds)]
    assert len(kv) == model.config.bert.num_hidden_layers - model.config.bert.fusion_layer
    torch.testing.assert_close(model.bert.fuse(text_embeds, mask, None, image_kv=kv),
                               model.bert.fuse(text_embeds, mask, image_embeds[pairs]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bert(ids, mask, image_kv=kv), model.bert(ids, mask, image_embeds[pairs]),
                               rtol=1e-5, atol=1e-6)


def test_released_pretrain_checkpoint_loads_strictly_at_full_size() -> None:
    rows = read_manifest("albef_base_pretrain_keys.txt")
    config = ALBEFConfig(bert=BertConfig.from_json(os.path.join(ROOT, "configs", "config_bert.json")))
    model = ALBEFPretrain(config)
    state = state_from_manifest(rows)
    assert list(model.state_dict()) == [r[0] for r in rows]
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.text_encoder.cls.predictions.decoder.weight,
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert model.visual_encoder.pos_embed.shape == (1, 257, 768)


def test_loader_initialises_missing_momentum_and_interpolates_pos_embed() -> None:
    source = ALBEFPretrain(tiny_albef(image_res=32))
    state = {k: v for k, v in source.state_dict().items() if "_m." not in k}
    target = ALBEFPretrain(tiny_albef(image_res=48))
    report = load_weights(target, state)
    assert not report.suspicious
    assert set(report.momentum_initialised) == {"visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"}
    assert target.visual_encoder.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(target.visual_encoder.pos_embed[:, 0], source.visual_encoder.pos_embed[:, 0])
    assert torch.equal(target.visual_encoder_m.pos_embed, target.visual_encoder.pos_embed)
    assert torch.equal(target.text_proj_m.weight, source.text_proj.weight)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_cls_only_last_layer_gives_the_cls_row_and_its_gradients(grad_ckpt: bool) -> None:
    model = ALBEFPretrain(tiny_albef(grad_ckpt=grad_ckpt))
    model.eval()  # no dropout, so both paths see the same function
    model.bert.encoder.training = True  # ...but the checkpointed branch of the encoder runs when asked
    image, ids, mask = batch(3)
    image_embeds = model.encode_image(image)[0].detach()
    weights = torch.randn(2, 3, 1, model.config.bert.hidden_size)

    def grads(cls_only: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        text = model.bert.encode_text(ids, mask, cls_only=cls_only)
        fused = model.bert.fuse(model.bert.encode_text(ids, mask), mask, image_embeds, cls_only=cls_only)
        text, fused = text[:, :1], fused[:, :1]  # (3, 1, H): all that a cls_only caller reads
        ((text * weights[0]).sum() + (fused * weights[1]).sum()).backward()  # a generic linear read-out
        return text.detach(), fused.detach(), [p.grad.clone() for p in model.bert.parameters() if p.grad is not None]

    text_full, fused_full, grads_full = grads(False)
    text_cls, fused_cls, grads_cls = grads(True)
    assert model.bert.encode_text(ids, mask, cls_only=True).shape == (3, 1, model.config.bert.hidden_size)
    torch.testing.assert_close(text_cls, text_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_cls, fused_full, rtol=1e-5, atol=1e-6)
    assert len(grads_cls) == len(grads_full)
    scale = max(g.abs().max().item() for g in grads_full)
    assert scale > 1e-3
    for got, want in zip(grads_cls, grads_full):  # key biases have gradient 0 + rounding: absolute tolerance
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    logits = model.itm_logits(model.bert.encode_text(ids, mask), mask, image_embeds)
    torch.testing.assert_close(logits, model.itm_logits(model.bert.encode_text(ids, mask), mask, image_embeds,
                                                        cls_only=False), rtol=1e-5, atol=1e-6)


def test_rows_of_a_causal_layer_are_rejected() -> None:
    layer = ALBEFPretrain(tiny_albef()).bert.encoder.layer[0]
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(2, 5, 32), None, is_causal=True, rows=slice(0, 1))
