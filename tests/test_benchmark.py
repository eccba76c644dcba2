"""scripts/benchmark.py retrieval sections at tiny settings; the cached-fusion rerank against the plain one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_albef
from models import retrieval_eval as ev
from models import retrieval_reference
from models.model_retrieval import ALBEFRetrieval
from scripts import benchmark
from scripts.bench.inputs import make_captions


def random_features(model: ALBEFRetrieval, n_img: int, captions: int) -> ev.RetrievalFeatures:
    """Features of random images and random captions of 2..9 tokens padded to 9."""
    ids, att = make_captions(n_img * captions, 9, seed=3, tokens=(2, 9))
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.randn(n_img, 3, 32, 32))
        text_embeds, text_feat = model.encode_text(ids, att)
    return ev.RetrievalFeatures(image_embeds, image_feat, text_embeds, att, text_feat)


# one intra-op thread for every test of this file (the conftest fixture)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[ALBEFRetrieval, ev.RetrievalFeatures]:
    torch.manual_seed(2)
    model = ALBEFRetrieval(tiny_albef()).eval()
    return model, random_features(model, n_img=7, captions=3)


def test_cached_itm_logits_equal_model_itm_logits(tiny: tuple) -> None:
    model, f = tiny
    image = torch.tensor([0, 3, 3, 6, 1])
    text = torch.tensor([2, 0, 20, 5, 5])
    with torch.no_grad():
        plain = model.itm_logits(f.text_embeds[text], f.text_atts[text], f.image_embeds[image])
        states = ev.text_self_attention(model, f.text_embeds, f.text_atts, batch_size=4)[text]
        cached = ev.itm_logits_cached(
            model, states, f.text_atts[text], model.bert.image_keys_values(f.image_embeds), image
        )
    assert torch.allclose(cached, plain, atol=1e-5)


@pytest.mark.parametrize("cache_bytes", [1, 2**30])  # one image per key/value group; all images in one
def test_rerank_in_kv_groups_equals_per_query(tiny: tuple, monkeypatch: pytest.MonkeyPatch, cache_bytes: int) -> None:
    model, f = tiny
    monkeypatch.setattr(ev, "KV_CACHE_BYTES", cache_bytes)
    fast = ev.rerank_batched(model, f, k_test=4, batch_size=5)
    ref = retrieval_reference.rerank_per_query(model, f, k_test=4)
    for a, b in zip(fast, ref):
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_retrieval_sections_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    flags = "--only retrieval_eval,retrieval_step --sizes tiny --eval-images-tiny 6 --captions 2 --eval-k-tiny 4"
    flags += " --rerank-batch 5 --batch-tiny 4 --steps 2 --warmup 1"
    argv = [*flags.split(), "--json", str(out)]
    assert benchmark.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    (rerank,) = results["retrieval_eval"]
    assert rerank["identical_rankings"] is True and rerank["differing_queries"] == 0
    assert 0.0 <= rerank["max_score_diff"] < 1e-4  # float32 rounding: other summation order, logits of O(10)
    assert (rerank["size"], rerank["images"], rerank["texts"], rerank["k_test"]) == ("tiny", 6, 12, 4)
    assert rerank["pairs"] == 4 * (6 + 12)
    assert min(rerank["per_query_pairs_per_s"], rerank["batched_pairs_per_s"], rerank["speedup"]) > 0
    (step,) = results["retrieval_step"]
    assert (step["size"], step["batch"], step["precision"]) == ("tiny", 4, "fp32")
    assert len(step["ours_steps_s"]) == 2 and step["ours_s"] > 0 and step["ours_peak_mb"] > 0
    assert min(step["ours_fwd_s"], step["ours_bwd_s"], step["ours_opt_s"]) > 0


def test_pretrain_step_section_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    argv = "--only pretrain_step --sizes tiny --batch-tiny 4 --queue 64 --steps 2 --warmup 1".split()
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]["pretrain_step"]
    assert (row["size"], row["batch"], row["input"], row["precision"]) == ("tiny", 4, "32px T12 Q64", "fp32")
    assert len(row["ours_steps_s"]) == len(row["ref_steps_s"]) == 2
    assert row["ratio"] == pytest.approx(row["ours_s"] / row["ref_s"])
    # the shared image-encoder work is a small part of a tiny step (its cost is the 30,522-word vocabulary)
    assert 0 < row["vit_floor_s"] < row["ours_s"]
    assert row["floor_ratio"] == pytest.approx(row["vit_floor_s"] / row["ref_s"])


def test_data_pipeline_rows_per_source_and_shrunk_copy(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = "--only data_pipeline --images 2 --source-sizes 64x48,200x160 --short-side 100 --data-res 32".split()
    argv += "--loader-images 8 --loader-batch 4 --loader-workers 0 --memory-items 25000".split()
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["data_pipeline"]
    assert [(r["measure"], r["source"]) for r in rows] == [
        ("decode+augment", "64x48 JPEG"), ("decode+augment", "200x160 JPEG"),
        ("decode+augment", "200x160 JPEG shrunk to 125x100"), ("loader", "64x48 JPEG files + JSON"),
        ("loader", "64x48 JPEG in 8 shards"), ("dataset memory", "JSON annotation file"),
        ("dataset memory", "3 shards + manifest")]
    assert all(r["images_per_s"] > 0 and r["decode_ms"] > 0 and r["images"] == 2 for r in rows[:3])
    assert all(r["images_per_s"] > 0 and r["images"] == 8 and r["workers"] == 0 for r in rows[3:5])
    json_rss, shard_rss = (r["rss_mb"] for r in rows[5:])
    assert all(r["items"] == 25000 and r["rss_mb_at_14M"] == pytest.approx(r["rss_mb"] * 560) for r in rows[5:])
    assert json_rss > 3 and shard_rss < 1  # 25,000 items: several MiB of dicts; shards: 3 names and counts
    table = capsys.readouterr().out.split("== data_pipeline\n")[1].splitlines()
    assert table[0].split()[:3] == ["measure", "source", "transform"] and "rss_mb" in table[0]
    assert len(table) == 2 + len(rows)  # header, rule, a line per row (blank cells where a row lacks a field)


def test_source_sizes_are_checked() -> None:
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--source-sizes", "640by480"])
