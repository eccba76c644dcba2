"""Retrieval: R@K by hand, id-aware ITC targets, rerank == brute force / per-query, DDP, main([...]), checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_model import read_manifest, state_from_manifest

from conftest import tiny_albef
from engine import distributed
from models import retrieval_eval as ev
from models import retrieval_reference
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights
from models.model_pretrain import ALBEFPretrain
from models.model_retrieval import ALBEFRetrieval
from scripts.bench.retrieval_eval import spread_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ metrics
def test_recall_against_hand_built_scores() -> None:
    txt2img = torch.tensor([0, 0, 1, 1, 1, 2])  # image 0: 2 captions, image 1: 3, image 2: 1
    score_i2t = torch.tensor([
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.4],  # best caption t1 is its own: rank 0
        [0.9, 0.8, 0.1, 0.7, 0.2, 0.6],  # t0, t1, then t3 (its own; t2, t4 further down): rank 2
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # its only caption t5 is last: rank 5
    ])
    score_t2i = torch.tensor([
        [0.9, 0.1, 0.2],  # t0 -> image 0 first: rank 0
        [0.1, 0.9, 0.2],  # t1 -> image 0 last: rank 2
        [0.3, 0.8, 0.1],  # t2 -> image 1 first
        [0.5, 0.4, 0.3],  # t3 -> image 1 second: rank 1
        [0.2, 0.1, 0.7],  # t4 -> image 1 last: rank 2
        [0.1, 0.2, 0.3],  # t5 -> image 2 first
    ])
    m = ev.metrics_from_scores(score_i2t, score_t2i, txt2img)
    expected = {"txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 100.0, "txt_r_mean": 200 / 3,
                "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 250 / 3, "r_mean": 75.0}
    assert m == pytest.approx(expected)


def test_first_hit_and_shortlist_misses() -> None:
    hit = torch.tensor([[False, True, True], [False, False, False]])
    assert ev.first_hit(hit).tolist() == [1, 3]  # no hit in the shortlist: never within any K <= k


def test_shortlist_misses_are_misses_at_every_k() -> None:
    """k_test 3 < K = 5, 10: a match outside the shortlist must not count as retrieved at R@5 / R@10."""
    txt2img = torch.arange(4)  # one caption per image
    shortlists = torch.tensor([[0, 1, 2], [0, 2, 3], [3, 2, 0], [0, 1, 2]])  # hit at 0, miss, hit at 1, miss
    ranking = ev.Ranking(shortlists, torch.zeros(4, 3))
    m = ev.recall_metrics(ranking, ranking, txt2img)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (25.0, 50.0, 50.0)
    assert (m["img_r1"], m["img_r5"], m["img_r10"]) == (25.0, 50.0, 50.0)


# ------------------------------------------------------------------ training objective
def test_id_aware_itc_targets_share_the_mass() -> None:
    model = ALBEFRetrieval(tiny_albef(queue_size=4, distill=False))
    model.idx_queue.copy_(torch.tensor([[5, 1, -100, 1]]))
    idx = torch.tensor([1, 2, 1])
    feats = F.normalize(torch.randn(3, 16), dim=-1)
    loss, sim_i2t, sim_t2i = model.contrastive(feats, feats, feats, feats, idx, alpha=0.4)
    q = 1 / 4  # idx 1: batch items 0 and 2, queue slots 1 and 3 are all positives
    targets = torch.tensor([[q, 0, q, 0, q, 0, q],
                            [0, 1, 0, 0, 0, 0, 0],
                            [q, 0, q, 0, q, 0, q]])
    expected = -(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean() / 2 \
        - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean() / 2
    assert sim_i2t.shape == (3, 3 + 4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("idx", [[0, 1, 2, 3], [0, 0, 1, 1], [7, 7, 7, 7]])
def test_forward_backward_and_idx_queue(idx: list[int]) -> None:
    model = ALBEFRetrieval(tiny_albef())
    ids = torch.randint(1000, 3000, (4, 7))
    ids[:, 0] = 101
    out = model(torch.randn(4, 3, 32, 32), ids, torch.ones_like(ids), torch.tensor(idx), alpha=0.4)
    assert set(out) == {"loss_ita", "loss_itm"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert model.text_encoder.encoder.layer[3].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.idx_queue[0, :4].tolist() == idx and model.queue_ptr.item() == 4


# ------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def setup() -> tuple[ALBEFRetrieval, ev.RetrievalFeatures, torch.Tensor]:
    """A random tiny model and features of 6 images x 2 captions of varying lengths."""
    torch.manual_seed(1)
    model = ALBEFRetrieval(tiny_albef()).eval()
    ids = torch.randint(1000, 3000, (12, 9))
    ids[:, 0] = 101
    att = torch.ones_like(ids)
    for row, length in enumerate([9, 3, 5, 9, 2, 7, 4, 9, 6, 8, 3, 5]):
        att[row, length:] = 0
    ids = ids.masked_fill(att == 0, 0)
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.randn(6, 3, 32, 32))
        text_embeds, text_feat = model.encode_text(ids, att)
    return model, ev.RetrievalFeatures(image_embeds, image_feat, text_embeds, att, text_feat), torch.arange(12) // 2


def brute_force_itm(model: ALBEFRetrieval, f: ev.RetrievalFeatures) -> torch.Tensor:
    """Every (image, text) pair through the fusion encoder -> (N_img, N_txt) ITM positive logits."""
    n_img, n_txt = f.image_feat.size(0), f.text_feat.size(0)
    with torch.no_grad():
        logits = model.itm_logits(f.text_embeds.repeat(n_img, 1, 1), f.text_atts.repeat(n_img, 1),
                                  f.image_embeds.repeat_interleave(n_txt, dim=0))
    return logits[:, 1].view(n_img, n_txt)


def test_topk_rerank_equals_brute_force_when_k_covers_all(setup: tuple) -> None:
    model, f, txt2img = setup
    dense = brute_force_itm(model, f)
    i2t, t2i = ev.rerank_batched(model, f, k_test=12, batch_size=7)
    assert torch.equal(i2t.indices, dense.argsort(dim=1, descending=True))
    assert torch.equal(t2i.indices, dense.t().argsort(dim=1, descending=True))
    assert torch.allclose(i2t.scores, dense.sort(dim=1, descending=True).values, atol=1e-5)
    assert ev.recall_metrics(i2t, t2i, txt2img) == pytest.approx(ev.metrics_from_scores(dense, dense.t(), txt2img))


@pytest.mark.parametrize("score", ["itm", "itm+itc"])
def test_batched_rerank_equals_per_query(setup: tuple, score: str) -> None:
    model, f, _ = setup
    fast = ev.rerank_batched(model, f, k_test=3, score=score, batch_size=5)
    ref = retrieval_reference.rerank_per_query(model, f, k_test=3, score=score)
    for a, b in zip(fast, ref):
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
    stats = retrieval_reference.benchmark_rerank(model, f, k_test=3, batch_size=5, repeats=3)
    assert stats["identical_rankings"] and stats["pairs"] == 3 * (6 + 12) and stats["repeats"] == 3
    assert stats["speedup"] == pytest.approx(stats["batched_pairs_per_s"] / stats["per_query_pairs_per_s"])


def test_itc_only_ranking(setup: tuple) -> None:
    model, f, txt2img = setup
    i2t, t2i = ev.rerank_batched(model, f, k_test=0)
    sims = f.image_feat @ f.text_feat.t()
    assert i2t.indices.shape == (6, 10) and t2i.indices.shape == (12, 6)
    assert torch.equal(i2t.indices, sims.topk(10, dim=1).indices)
    assert ev.recall_metrics(i2t, t2i, txt2img) == pytest.approx(ev.metrics_from_scores(sims, sims.t(), txt2img))


def _ddp_worker(rank: int, world: int, init_file: str, model: ALBEFRetrieval, f: ev.RetrievalFeatures,
                out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        i2t, t2i = ev.rank_all(model, f, k_test=3, batch_size=4)
        torch.save((i2t.indices, t2i.indices, i2t.scores, t2i.scores), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_rerank_matches_one_process(setup: tuple, tmp_path) -> None:
    model, f, _ = setup
    assert [distributed.shard_range(12, r, 5) for r in range(5)] == [(0, 2), (2, 4), (4, 7), (7, 9), (9, 12)]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), model, f, str(tmp_path / "out")), nprocs=2)
    single = ev.rank_all(model, f, k_test=3, batch_size=4)
    for rank in range(2):
        i2t_idx, t2i_idx, i2t_s, t2i_s = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(i2t_idx, single[0].indices) and torch.equal(t2i_idx, single[1].indices)
        assert torch.allclose(i2t_s, single[0].scores, atol=1e-5)


# ------------------------------------------------------------------ end to end
def test_main_fine_tunes_then_evaluates(tmp_path) -> None:
    import Retrieval
    from dataset.toy_world import ensure_toy_world

    world = ensure_toy_world(str(tmp_path / "toy"), n_train=40, n_val=10, n_test=12)
    common = ["--config", os.path.join(ROOT, "configs", "toy", "Retrieval.yaml"), "--override",
              "toy_world=''", f"train_file=[{world}/retrieval_train.json]", f"val_file={world}/retrieval_val.json",
              f"test_file={world}/retrieval_test.json", f"image_root={world}", "schedular.epochs=1",
              "batch_size_train=8", "queue_size=16", "k_test=4", "num_workers=0", "image_res=32"]
    out = str(tmp_path / "run")
    results = Retrieval.main(["--output_dir", out, *common])
    assert results["best_epoch"] == 0 and set(results) >= {"val", "test"}
    assert 0.0 <= results["test"]["r_mean"] <= 100.0
    with open(os.path.join(out, "log.txt")) as fh:
        lines = [json.loads(line) for line in fh]
    assert len(lines) == 1 and "val_txt_r1" in lines[0] and "score" in lines[0]  # one line per epoch, one shape
    assert lines[0]["val_images"] == 10 and lines[0]["val_unreadable_images"] == 0  # how much was evaluated
    assert "img_r10" in results["test"] and results["test"]["texts"] == 60

    evaluated = Retrieval.main(["--output_dir", str(tmp_path / "eval"), "--evaluate", "--checkpoint",
                                os.path.join(out, "checkpoint_best.pth"), *common])
    assert evaluated["test"] == pytest.approx(results["test"])
    with open(tmp_path / "eval" / "result" / "retrieval_metrics.json") as fh:
        assert json.load(fh)["val"] == pytest.approx(results["val"])


# ------------------------------------------------------------------ multi-process (torchrun, gloo on CPU)
@pytest.fixture(scope="module")
def ddp_world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 train images (21 captions: 2 steps of 2 x 4), 9 val images (uneven query shares 4 + 5), 12 test."""
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_ddp")), n_train=8, n_val=9, n_test=12)


def ddp_argv(world: str, out: str, *flags: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "toy", "Retrieval.yaml"), "--output_dir", out, "--device",
            "cpu", *flags, "--override", "toy_world=''", f"train_file=[{world}/retrieval_train.json]",
            f"val_file={world}/retrieval_val.json", f"test_file={world}/retrieval_test.json", f"image_root={world}",
            "schedular.epochs=1", "batch_size_train=4", "batch_size_test=4", "queue_size=48", "k_test=4",
            "num_workers=0", "image_res=32", *overrides]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 Retrieval.py ARGS`` (a free port; gloo on CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "Retrieval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def spread_checkpoint(path: str) -> str:
    """A random-init toy model whose weight matrices are drawn at std 0.3 (BERT init: 0.02), saved as {'model'}.

    At the usual init the tiny encoders map every image and every caption to nearly the same feature, so all
    queries get the same ranking and a mis-ordered gather of the rank shares would not change any metric.
    """
    import Retrieval
    from engine.config import load_config

    config = load_config(os.path.join(ROOT, "configs", "toy", "Retrieval.yaml"), Retrieval.DEFAULTS,
                         ["toy_world=''", "image_res=32", "queue_size=48"])
    model = ALBEFRetrieval(ALBEFConfig.from_config(config))
    spread_weights(model, 0.3)
    torch.save({"model": model.state_dict()}, path)
    return path


def read_metrics(out: str) -> dict:
    with open(os.path.join(out, "result", "retrieval_metrics.json")) as fh:
        return json.load(fh)


def output_files(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)


def test_two_processes_evaluate_exactly_like_one(ddp_world: str, tmp_path) -> None:
    """``torchrun --nproc_per_node=2 Retrieval.py --evaluate`` writes the metrics of one process, to the bit.

    Every rank encodes all images and texts and reranks a contiguous share of the queries (val: 4 + 5 images,
    22 + 23 texts); the shares are gathered in rank order. Rank 0 alone writes the output folder.
    """
    import Retrieval

    ckpt = spread_checkpoint(str(tmp_path / "spread.pth"))
    two = str(tmp_path / "two")
    result = torchrun(ddp_argv(ddp_world, two, "--evaluate", "--checkpoint", ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    one = str(tmp_path / "one")
    Retrieval.main(ddp_argv(ddp_world, one, "--evaluate", "--checkpoint", ckpt))
    metrics_one, metrics_two = read_metrics(one), read_metrics(two)
    for split in ("val", "test"):
        assert metrics_two[split] == metrics_one[split], split
    assert len({v for split in ("val", "test") for v in metrics_one[split].values()}) > 4  # not all 0 / 100
    assert output_files(two) == ["config.yaml", "log.txt", "result/retrieval_metrics.json", "train.log"]
    with open(os.path.join(two, "log.txt")) as fh:
        assert len(fh.readlines()) == 1


def test_two_process_fine_tuning_writes_on_rank0_only(ddp_world: str, tmp_path) -> None:
    """A 2-step fine-tuning epoch under torchrun --nproc_per_node=2: one log line per event, one set of files."""
    out = str(tmp_path / "ddp")
    result = torchrun(ddp_argv(ddp_world, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 per process x 2 process(es) = 8 global" in result.stderr
    assert output_files(out) == ["checkpoint_00.pth", "checkpoint_best.pth", "config.yaml", "log.txt",
                                 "result/retrieval_metrics.json", "train.log"]
    with open(os.path.join(out, "log.txt")) as fh:
        lines = [json.loads(line) for line in fh]
    assert [line.get("epoch") for line in lines] == [0]  # the test results are in retrieval_metrics.json
    with open(os.path.join(out, "train.log")) as fh:
        assert "[rank1]" not in fh.read()
    state = torch.load(os.path.join(out, "checkpoint_00.pth"), weights_only=True)
    assert state["epoch"] == 0
    assert state["model"]["queue_ptr"].item() == 16  # 21 captions // global batch 8 = 2 steps of 8 features
    assert (state["model"]["idx_queue"][0, :16] >= 0).all() and (state["model"]["idx_queue"][0, 16:] == -100).all()
    assert set(read_metrics(out)) >= {"val", "test"}


# ------------------------------------------------------------------ checkpoints
def test_pretrain_state_loads_into_larger_retrieval_model() -> None:
    source = ALBEFPretrain(tiny_albef(image_res=32))  # 16 patches, like 256 px -> 384 px (256 -> 576)
    target = ALBEFRetrieval(tiny_albef(image_res=48))
    report = load_weights(target, source.state_dict())
    assert not report.suspicious and not report.momentum_initialised
    assert target.visual_encoder.pos_embed.shape == target.visual_encoder_m.pos_embed.shape == (1, 1 + 36, 32)
    layer = "encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(target.text_encoder.get_parameter(layer), source.text_encoder.bert.get_parameter(layer))
    assert torch.equal(target.text_encoder_m.get_parameter(layer), source.text_encoder_m.bert.get_parameter(layer))
    assert (target.idx_queue == -100).all()


def test_released_retrieval_checkpoint_loads_strictly_at_full_size() -> None:
    rows = read_manifest("albef_base_retrieval_keys.txt")
    config = ALBEFConfig(bert=BertConfig.from_json(os.path.join(ROOT, "configs", "config_bert.json")), image_res=384)
    model = ALBEFRetrieval(config)
    assert list(model.state_dict()) == [r[0] for r in rows]
    model.load_state_dict(state_from_manifest(rows), strict=True)
    assert model.visual_encoder_m.pos_embed.shape == (1, 577, 768) and model.idx_queue.shape == (1, 65536)
    released = {k: v for k, v in state_from_manifest(rows).items() if "_m." not in k}  # mscoco.pth: no momentum
    report = load_weights(model, released)
    assert not report.suspicious and len(report.momentum_initialised) == 4
