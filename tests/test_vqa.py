"""VQA: decoder, loss, answer ranking, checkpoint mapping (tiny sizes; the manifest check at full size on meta)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from test_model import read_manifest

from conftest import tiny_albef
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights
from models.model_pretrain import ALBEFPretrain
from models.model_vqa import ALBEFVQA, answer_loss
from models.vqa_rank import rank_answers, rank_answers_reference, select_candidates, top_answers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS, SEP = 101, 102


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than several, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def questions(b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (b, 3, 32, 32) and questions (b, 6); the second question is padded after 4 tokens."""
    ids = torch.randint(1000, 3000, (b, 6))
    ids[:, 0] = CLS
    atts = torch.ones_like(ids)
    ids[1, 4:], atts[1, 4:] = 0, 0
    return torch.randn(b, 3, 32, 32), ids, atts


def answers(lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised answers ``[CLS] w.. [SEP] [PAD]..`` of the given lengths (tokens incl. [CLS] and [SEP])."""
    width = width or max(lengths)
    ids = torch.randint(1000, 3000, (len(lengths), width))
    atts = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1], ids[i, n:] = CLS, SEP, 0
        atts[i, :n] = 1
    return ids, atts


def peaky(model: ALBEFVQA) -> ALBEFVQA:
    """Larger weights, so that rankings depend clearly on the question (distinct, well separated scores)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


# ---------------------------------------------------------------------------------------------- parameters
def test_state_dict_is_the_released_vqa_checkpoint_layout_at_full_size() -> None:
    rows = read_manifest("albef_base_vqa_keys.txt")
    config = ALBEFConfig(bert=BertConfig.from_json(os.path.join(ROOT, "configs", "config_bert.json")), image_res=384)
    with torch.device("meta"):
        model = ALBEFVQA(config)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(r[0], r[1]) for r in rows]
    dec = model.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight  # tied as in vqa.pth
    assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype, tied in rows:
        state[key] = state[tied] if tied else torch.empty(shape, dtype=dtypes[dtype], device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    assert len(dec.bert.encoder.layer) == 6 and all(layer.has_cross_attention for layer in dec.bert.encoder.layer)
    assert not any(p.requires_grad for p in model.text_decoder_m.parameters())


def test_without_distill_there_are_no_momentum_twins() -> None:
    model = ALBEFVQA(tiny_albef(distill=False))
    assert {k.split(".")[0] for k in model.state_dict()} == {"visual_encoder", "text_encoder", "text_decoder"}


# ---------------------------------------------------------------------------------------------- loss
def test_answer_loss_equals_hand_computation() -> None:
    # 2 questions, 3 answers: q0 -> a0 (weight 0.7, 2 targets), a1 (0.3, 3 targets); q1 -> a2 (0.5, 2 targets).
    # Every row has probabilities (1/2, 1/4, 1/8, 1/8): CE of target 0 is ln 2, of target 1 2 ln 2.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])).repeat(7, 1)
    targets = torch.tensor([0, 1, 0, 0, 0, 1, 1])
    row_answer = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    weights = torch.tensor([0.7, 0.3, 0.5])
    ln2 = math.log(2)
    # CE per answer: a0 3 ln2, a1 3 ln2, a2 4 ln2 -> (0.7*3 + 0.3*3 + 0.5*4) ln2 / 2 images = 2.5 ln2
    assert answer_loss(logits, targets, row_answer, weights, 2).item() == pytest.approx(2.5 * ln2, rel=1e-6)
    # uniform soft labels: -sum 1/4 log p = (1 + 2 + 3 + 3)/4 ln2 = 2.25 ln2 per row
    # distill = (0.7*2*2.25 + 0.3*3*2.25 + 0.5*2*2.25) ln2 / 2 = 3.7125 ln2; mixed 0.6*2.5 + 0.4*3.7125 = 2.985
    soft = torch.full((7, 4), 0.25)
    got = answer_loss(logits, targets, row_answer, weights, 2, soft, alpha=0.4)
    assert got.item() == pytest.approx(2.985 * ln2, rel=1e-6)


def official_loss(model: ALBEFVQA, image, q_ids, q_atts, a_ids, a_atts, n, weights, alpha) -> torch.Tensor:
    """The official forward written plainly: question states repeated per answer, full decoder logits,
    next-token CE with labels -100 at [PAD], per-answer sums, soft labels from the momentum decoder."""
    def logits_of(vit, bert, decoder):
        states = bert(q_ids, q_atts, vit(image)).repeat_interleave(n, dim=0)
        hidden = decoder.bert(a_ids, a_atts, states, q_atts.repeat_interleave(n, dim=0), is_causal=True)
        return decoder.cls(hidden)[:, :-1]  # (N, T-1, V)

    labels = a_ids.masked_fill(a_ids == 0, -100)[:, 1:]
    logits = logits_of(model.visual_encoder, model.text_encoder, model.text_decoder)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)  # (N,)
    if alpha > 0:
        with torch.no_grad():
            soft = logits_of(model.visual_encoder_m, model.text_encoder_m, model.text_decoder_m).softmax(-1)
        distill = (-(soft * logits.log_softmax(-1)).sum(-1) * (labels != -100)).sum(1)
        ce = (1 - alpha) * ce + alpha * distill
    return (weights * ce).sum() / image.size(0)


@pytest.mark.parametrize("distill", [True, False])
def test_model_loss_equals_official_computation_on_two_questions_three_answers(distill: bool) -> None:
    model = ALBEFVQA(tiny_albef(distill=distill)).eval()  # eval: no dropout, the same function twice
    if distill:
        with torch.no_grad():
            for p in model.text_decoder_m.parameters():
                p.add_(0.05 * torch.randn_like(p))  # a teacher that differs from the student
    image, q_ids, q_atts = questions(2)
    a_ids, a_atts = answers([3, 5, 4])
    n, weights = torch.tensor([2, 1]), torch.tensor([0.7, 0.3, 0.5])
    alpha = 0.4 if distill else 0.0
    loss = model(image, q_ids, q_atts, a_ids, a_atts, n, weights, alpha=alpha)["loss"]
    # the forward's momentum update has run: the reference reads the updated twins
    expected = official_loss(model, image, q_ids, q_atts, a_ids, a_atts, n, weights, alpha)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.text_encoder.encoder.layer[3].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_momentum_update_moves_the_twins_towards_the_online_weights() -> None:
    model = ALBEFVQA(tiny_albef())
    with torch.no_grad():
        model.text_decoder.cls.predictions.transform.dense.weight.add_(1.0)
    before = model.text_decoder_m.cls.predictions.transform.dense.weight.clone()
    image, q_ids, q_atts = questions(2)
    a_ids, a_atts = answers([3, 3])
    model(image, q_ids, q_atts, a_ids, a_atts, torch.tensor([1, 1]), torch.ones(2), alpha=0.0)
    after = model.text_decoder_m.cls.predictions.transform.dense.weight
    torch.testing.assert_close(after - before, torch.full_like(before, 0.005), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ranking
def brute_force(model: ALBEFVQA, image, q_ids, q_atts, a_ids, a_atts) -> torch.Tensor:
    """(Q, A) probabilities of every answer: each decoded alone, unpadded, score = log p1 + sum_t log p(a_t)."""
    states = model.encode_question(image, q_ids, q_atts)
    dec = model.text_decoder
    scores = torch.zeros(states.size(0), a_ids.size(0))
    for qi in range(states.size(0)):
        s, m = states[qi:qi + 1], q_atts[qi:qi + 1]
        for ai in range(a_ids.size(0)):
            ids = a_ids[ai:ai + 1, : int(a_atts[ai].sum())]  # (1, T_a)
            logp = dec.cls(dec.bert(ids, torch.ones_like(ids), s, m, is_causal=True)).log_softmax(-1)[0]
            token_logp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # log p(a_t | a_<t), t = 1..T_a-1
            scores[qi, ai] = token_logp[0] + token_logp.sum()  # the first token counts twice
    return scores.softmax(dim=1)


def test_ranking_equals_brute_force_when_k_is_the_answer_list_size() -> None:
    model = peaky(ALBEFVQA(tiny_albef()))
    image, q_ids, q_atts = questions(3)
    a_ids, a_atts = answers([3, 4, 3, 5, 3, 4], width=7)  # padded beyond the longest answer
    a_ids[5, 1] = a_ids[1, 1]  # two answers share a first token
    with torch.no_grad():
        ids, probs = model.rank(image, q_ids, q_atts, a_ids, a_atts, k=6)
        expected = brute_force(model, image, q_ids, q_atts, a_ids, a_atts)
    torch.testing.assert_close(torch.zeros_like(expected).scatter(1, ids, probs), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(ids[:, 0], expected.argmax(dim=1))
    assert len(set(ids[:, 0].tolist())) > 1  # the questions get different answers
    assert torch.all(probs[:, :-1] >= probs[:, 1:])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_ranking_equals_the_official_style_reference(k: int) -> None:
    model = peaky(ALBEFVQA(tiny_albef()))
    image, q_ids, q_atts = questions(4)
    a_ids, a_atts = answers([3, 4, 3, 5, 3, 2, 4, 6], width=8)  # answer 5 is empty: [CLS] [SEP]
    states = model.encode_question(image, q_ids, q_atts)
    got = rank_answers(model.text_decoder, states, q_atts, a_ids, a_atts, k)
    ref = rank_answers_reference(model.text_decoder, states, q_atts, a_ids, a_atts, k)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


def test_ties_are_broken_by_answer_list_order() -> None:
    first = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3]])  # answers 1, 2, 4 share the best first token
    probs, ids = select_candidates(first, 2)
    assert ids.tolist() == [[1, 2]] and probs[0].tolist() == pytest.approx([0.3, 0.3])
    model = peaky(ALBEFVQA(tiny_albef()))
    image, q_ids, q_atts = questions(2)
    a_ids, a_atts = answers([3, 4, 3])
    a_ids, a_atts = torch.cat([a_ids, a_ids[1:2]]), torch.cat([a_atts, a_atts[1:2]])  # answer 3 == answer 1
    ids, probs = model.rank(image, q_ids, q_atts, a_ids, a_atts, k=4)
    for row, p in zip(ids.tolist(), probs):
        assert row.index(1) + 1 == row.index(3)  # equal scores: the earlier list entry first, adjacent
        assert p[row.index(1)] == p[row.index(3)]


def test_top_answers_lists_the_best_n_with_probabilities() -> None:
    ids = torch.tensor([[2, 0, 1], [1, 2, 0]])
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.06, 0.04]])
    got = top_answers(ids, probs, ["yes", "no", "2"], n=2)
    assert [[a for a, _ in row] for row in got] == [["2", "yes"], ["no", "2"]]
    assert got[1][0][1] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        rank_answers(ALBEFVQA(tiny_albef()).text_decoder, torch.zeros(1, 2, 32), torch.ones(1, 2, dtype=torch.long),
                     *answers([3, 3, 3]), k=4)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_pretrain_checkpoint_initialises_the_decoder_from_the_fusion_layers_and_mlm_head() -> None:
    source = ALBEFPretrain(tiny_albef(image_res=32))  # fusion_layer 2 of 4 layers
    target = ALBEFVQA(tiny_albef(image_res=48))
    report = load_weights(target, {"module." + k: v for k, v in source.state_dict().items()})
    assert not report.suspicious and not report.missing and not report.momentum_initialised
    for suffix in ("", "_m"):
        enc, dec = source.get_submodule("text_encoder" + suffix), target.get_submodule("text_decoder" + suffix)
        for i in range(2):  # decoder layer i <- encoder layer 2 + i, every parameter
            for (name, p), (_, p_src) in zip(dec.bert.encoder.layer[i].named_parameters(),
                                             enc.bert.encoder.layer[2 + i].named_parameters()):
                assert torch.equal(p, p_src), name
        assert torch.equal(dec.bert.embeddings.word_embeddings.weight, enc.bert.embeddings.word_embeddings.weight)
        assert torch.equal(dec.cls.predictions.transform.dense.weight, enc.cls.predictions.transform.dense.weight)
        assert torch.equal(dec.cls.predictions.bias, enc.cls.predictions.bias)
        # the encoder keeps all its layers, text and fusion
        layer = "encoder.layer.1.attention.self.query.weight"
        assert torch.equal(target.get_submodule("text_encoder" + suffix).get_parameter(layer),
                           enc.bert.get_parameter(layer))
    assert target.visual_encoder.pos_embed.shape == target.visual_encoder_m.pos_embed.shape == (1, 37, 32)


def test_vqa_checkpoint_loads_as_it_is() -> None:
    source = peaky(ALBEFVQA(tiny_albef()))
    target = ALBEFVQA(tiny_albef())
    report = load_weights(target, source.state_dict())
    assert not report.missing and not report.unexpected
    for (name, p), p_src in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(p, p_src), name
