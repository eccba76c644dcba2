"""The one checkpoint loader: every released layout in every format in circulation, one clear message for what does
not fit (another task, another size, not a checkpoint, nothing matching, suspicious keys), checkpoint metadata and
the architecture read back from any checkpoint. Full-size layouts are built on the meta device (keys and shapes,
no memory); values are checked on tiny models."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from test_model import ROOT, read_manifest

from conftest import tiny_albef, tiny_bert
from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import CheckpointError, load_weights, read_state_dict, set_allow_partial
from models.checkpoint_info import adopt_checkpoint_sizes, architecture, checkpoint_meta, guess_task, read_meta
from models.model_nlvr import ALBEFNLVR
from models.model_pretrain import ALBEFPretrain
from models.model_retrieval import ALBEFRetrieval
from models.model_ve import ALBEFVE
from models.model_vqa import ALBEFVQA

FULL_BERT = os.path.join(ROOT, "configs", "config_bert.json")
# manifest -> (task model, resolution of the released files)
MANIFESTS = {"albef_base_pretrain_keys.txt": (ALBEFPretrain, 256),
             "albef_base_retrieval_keys.txt": (ALBEFRetrieval, 384), "albef_base_vqa_keys.txt": (ALBEFVQA, 384),
             "albef_base_nlvr_keys.txt": (ALBEFNLVR, 384)}
TWINS = {ALBEFPretrain: ["visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"],
         ALBEFRetrieval: ["visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"],
         ALBEFVQA: ["visual_encoder_m", "text_encoder_m", "text_decoder_m"],
         ALBEFNLVR: ["visual_encoder_m", "text_encoder_m", "cls_head_m"]}


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """A state dict with exactly the manifest's keys and shapes, on the meta device (tied keys share a tensor)."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype, tied in read_manifest(name):
        state[key] = state[tied] if tied else torch.empty(shape, dtype=dtypes[dtype], device="meta")
    return state


def full_model(cls: type, image_res: int) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(ALBEFConfig(bert=BertConfig.from_json(FULL_BERT), image_res=image_res))


def formats(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The formats in circulation: {'model': ...} (official), raw (refcoco.pth), no momentum weights (mscoco.pth,
    the TA checkpoint), DDP's 'module.' prefix."""
    return {"wrapped": {"model": state, "epoch": 29, "config": {"image_res": 256}}, "raw": state,
            "no_momentum": {k: v for k, v in state.items() if k.split(".")[0][-2:] != "_m"},
            "module": {"module." + k: v for k, v in state.items()}}


# ----------------------------------------------------------------------------- released layouts, full size
@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_every_released_layout_loads_in_every_format_with_nothing_suspicious(manifest: str) -> None:
    cls, res = MANIFESTS[manifest]
    model = full_model(cls, res)
    state = meta_state(manifest)
    for fmt, source in formats(state).items():
        report = load_weights(model, source)
        assert not report.suspicious and not report.missing and not report.unexpected, (manifest, fmt)
        assert report.momentum_initialised == (TWINS[cls] if fmt == "no_momentum" else []), (manifest, fmt)
        keys = source.get("model", source)
        assert report.loaded == sum(not k.endswith(("_queue", "queue_ptr", "position_ids")) for k in keys)
    assert guess_task(state) == {ALBEFPretrain: "pretrain", ALBEFRetrieval: "retrieval", ALBEFVQA: "vqa",
                                 ALBEFNLVR: "nlvr"}[cls]


@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_architecture_is_read_back_from_the_tensor_shapes_of_a_released_file(manifest: str) -> None:
    cls, res = MANIFESTS[manifest]
    config, decoder = architecture(meta_state(manifest), {}, guess_task(meta_state(manifest)))
    assert config.bert == BertConfig.from_json(FULL_BERT)  # 12 layers also for NLVR2's 18-layer encoder
    assert (config.image_res, config.patch_size, config.vision_width, config.vision_depth, config.vision_heads,
            config.embed_dim) == (res, 16, 768, 12, 12, 256)
    assert decoder == (6 if cls is ALBEFVQA else None)
    with torch.device("meta"):
        rebuilt = cls(config, decoder) if cls is ALBEFVQA else cls(config)
    def online(state: dict) -> dict:  # inference configs: no twins (distill off), a queue of one
        return {k: tuple(v.shape) for k, v in state.items() if "_queue" not in k and not k.split(".")[0][-2:] == "_m"}

    assert online(rebuilt.state_dict()) == online(meta_state(manifest))


def test_a_checkpoint_of_another_task_stops_with_one_message_naming_its_keys() -> None:
    model = full_model(ALBEFRetrieval, 384)
    with pytest.raises(CheckpointError) as vqa:
        load_weights(model, {"model": meta_state("albef_base_vqa_keys.txt")}, name="vqa.pth")
    text = str(vqa.value)
    assert "\n" not in text and text.startswith("vqa.pth does not match the model")
    assert "looks like a vqa checkpoint" in text and "ALBEFRetrieval (retrieval)" in text
    assert "missing: temp, vision_proj.* (2 keys, e.g. vision_proj.weight), text_proj.* (2 keys" in text
    assert "unexpected: text_decoder.* (168 keys, e.g. text_decoder.bert.embeddings.word_embeddings.weight)" in text
    assert "--allow_partial" in text
    with pytest.raises(CheckpointError, match=r"looks like a nlvr checkpoint.*"):
        load_weights(full_model(ALBEFVQA, 384), meta_state("albef_base_nlvr_keys.txt"))
    ve = ALBEFVE(tiny_albef())  # an SNLI-VE head (3 classes) into NLVR2 (2): a shape, named with both sizes
    with pytest.raises(CheckpointError, match=r"cls_head.2.weight \[3, 32\] vs \[2, 32\].*looks like a ve "
                                              r"checkpoint, the model is ALBEFNLVR \(nlvr\)"):
        load_weights(ALBEFNLVR(tiny_albef()), ve.state_dict())


def test_a_checkpoint_of_another_size_stops_with_one_message_naming_keys_and_shapes_and_loads_nothing() -> None:
    tiny = ALBEFPretrain(tiny_albef())
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny, {"model": meta_state("albef_base_pretrain_keys.txt")}, name="ALBEF.pth")
    text = str(info.value)
    assert "\n" not in text and len(text) < 1500
    assert text.startswith("ALBEF.pth does not fit the model:") and "tensor(s) differ in shape" in text
    assert "visual_encoder.cls_token [1, 1, 768] vs [1, 1, 32]" in text and "and " in text and " more" in text
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())  # nothing was loaded
    with pytest.raises(CheckpointError, match=r"\[1, 1, 32\] vs \[1, 1, 768\]"):
        load_weights(full_model(ALBEFPretrain, 256), tiny.state_dict())


# ----------------------------------------------------------------------------- values, tiny
@pytest.mark.parametrize("fmt", ["wrapped", "raw", "no_momentum", "module"])
def test_each_format_on_disk_loads_every_value(fmt: str, tmp_path) -> None:
    source = ALBEFRetrieval(tiny_albef(image_res=32))
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = str(tmp_path / "ckpt.pth")
    torch.save(formats(source.state_dict())[fmt], path)
    target = ALBEFRetrieval(tiny_albef(image_res=32))
    report = load_weights(target, path)
    assert not report.suspicious
    for key, value in source.state_dict().items():
        if fmt == "no_momentum" and "_m." in key:  # initialised from the online weights
            value = source.state_dict()[key.replace("_m.", ".", 1)]
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle, read by torch.load
def test_files_that_are_not_checkpoints_end_in_one_line(tmp_path) -> None:
    good = ALBEFRetrieval(tiny_albef()).state_dict()
    torch.save({"model": good}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("this is a README, not weights\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([good], tmp_path / "list.pth")
    torch.save({"epoch": 3, "state": 1}, tmp_path / "nomodel.pth")
    with open(tmp_path / "pickled.pth", "wb") as f:
        pickle.dump([1, 2, 3], f)
    expected = {"truncated": "truncated or corrupt", "text": "not a PyTorch checkpoint", "empty": "is empty",
                "list": "holds a list", "nomodel": "no 'model' entry and is not a state dict (keys: epoch, state)",
                "pickled": "not a PyTorch checkpoint"}
    for name, why in expected.items():
        path = str(tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError) as info:
            load_weights(ALBEFRetrieval(tiny_albef()), path)
        assert why in str(info.value) and path in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(str(tmp_path / "missing.pth"))


def test_a_checkpoint_matching_none_of_the_weights_stops() -> None:
    deit = {"cls_token": torch.zeros(1, 1, 32), "blocks.0.attn.qkv.weight": torch.zeros(96, 32)}
    with pytest.raises(CheckpointError, match=r"matches none of the weights of ALBEFRetrieval \(checkpoint keys: "
                                              r"cls_token, blocks.0.attn.qkv.weight\)"):
        load_weights(ALBEFRetrieval(tiny_albef()), deit, allow_partial=True)
    queues_only = {k: v for k, v in ALBEFRetrieval(tiny_albef()).state_dict().items() if "queue" in k}
    with pytest.raises(CheckpointError, match="matches none"):
        load_weights(ALBEFRetrieval(tiny_albef()), queues_only)


def test_allow_partial_loads_what_matches_and_names_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    source = ALBEFRetrieval(tiny_albef())
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("itm_head")}
    target = ALBEFRetrieval(tiny_albef())
    head = target.itm_head.weight.clone()
    with pytest.raises(CheckpointError, match=r"missing: itm_head.\* \(2 keys"):
        load_weights(target, partial)
    with caplog.at_level(logging.WARNING):
        report = load_weights(target, partial, allow_partial=True)
    assert report.suspicious == ["itm_head.weight", "itm_head.bias"] and "itm_head" in caplog.text
    assert torch.equal(target.itm_head.weight, head) and torch.equal(target.text_proj.weight, source.text_proj.weight)
    set_allow_partial(True)  # the process default: --allow_partial / allow_partial: true
    try:
        assert load_weights(ALBEFRetrieval(tiny_albef()), partial).suspicious
    finally:
        set_allow_partial(False)


def test_momentum_weights_of_twins_the_model_does_not_build_are_dropped() -> None:
    source = ALBEFVQA(tiny_albef())  # distill: twins saved
    plain = ALBEFVQA(tiny_albef(distill=False))
    report = load_weights(plain, source.state_dict())
    assert not report.unexpected and not report.missing


# ----------------------------------------------------------------------------- metadata
def test_metadata_rebuilds_the_model_and_is_readable_without_loading_tensors(tmp_path) -> None:
    config = tiny_albef(bert=tiny_bert(hidden_size=48, num_attention_heads=3, encoder_width=48), vision_width=48,
                        vision_heads=3, image_res=48)
    model = ALBEFNLVR(config)
    meta = checkpoint_meta(model, {"max_words": 30, "max_tokens": 40}, "NLVR.py", commit="abc")
    assert meta["task"] == "nlvr" and meta["stage"] == "fine-tuning" and meta["version"] and meta["commit"] == "abc"
    assert meta["bert"]["num_hidden_layers"] == 4 and meta["bert"]["num_attention_heads"] == 3  # the 12-layer form
    assert meta["image_res"] == 48 and meta["vit"] == {"patch_size": 8, "width": 48, "depth": 2, "heads": 3}
    assert meta["text"]["max_tokens"] == 40
    assert checkpoint_meta(ALBEFPretrain(tiny_albef()), {}, "Pretrain.py")["stage"] == "pre-training"
    assert checkpoint_meta(ALBEFVQA(tiny_albef()), {}, None)["decoder_layers"] == 2
    path = str(tmp_path / "c.pth")
    torch.save({"model": model.state_dict(), "meta": meta, "config": {"image_res": 48}}, path)
    assert read_meta(path) == (meta, {"image_res": 48})
    state, ckpt = read_state_dict(path)
    rebuilt, _ = architecture(state, ckpt, "nlvr")
    assert rebuilt.bert == config.bert and rebuilt.vision_heads == 3 and rebuilt.image_res == 48


# ----------------------------------------------------------------------------- entry scripts: --checkpoint, --resume
TINY = ["bert_config=configs/toy/config_bert.json", "image_res=32", "vision_width=128",
        "vit={patch_size: 8, depth: 2, heads: 4}", "embed_dim=32", "batch_size=4", "queue_size=8",
        "num_workers=0", "max_tokens=24", "schedular.epochs=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dataset.toy_world import ensure_toy_world

    return ensure_toy_world(str(tmp_path_factory.mktemp("toy_ckpt")), n_train=4, n_val=4, n_test=4)


def run_pretrain(world: str, out: str, *flags: str, caplog: pytest.LogCaptureFixture) -> tuple[int, list[str]]:
    """``Pretrain.py`` through ``run_main``: (exit code, the ERROR lines)."""
    import Pretrain
    from engine import trainer

    caplog.clear()
    argv = ["--config", os.path.join(ROOT, "configs", "toy", "Pretrain.yaml"), "--output_dir", out, "--device", "cpu",
            *flags, "--override", "toy_world=''", f"train_file=[{world}/pretrain.json]", *TINY]
    with caplog.at_level(logging.INFO):
        code = trainer.run_main(lambda: Pretrain.main(argv))
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def toy_pretrain_model() -> ALBEFPretrain:
    import Pretrain
    from engine.config import load_config

    config = load_config(os.path.join(ROOT, "configs", "toy", "Pretrain.yaml"), Pretrain.DEFAULTS,
                         ["toy_world=''", *TINY])
    return ALBEFPretrain(ALBEFConfig.from_config(config))


def test_entry_scripts_stop_in_one_line_for_checkpoint_and_resume(world: str, tmp_path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "text.pth").write_text("not weights")
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "nomodel.pth")
    other = {"model": ALBEFPretrain(tiny_albef()).state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 0}
    torch.save(other, tmp_path / "other_size.pth")
    cases = [(("--checkpoint", "text.pth"), "CheckpointError: cannot read checkpoint", "not a PyTorch checkpoint"),
             (("--resume", "nomodel.pth"), "CheckpointError: cannot resume from", "holds no 'model', 'lr_scheduler'"),
             (("--checkpoint", "other_size.pth"), "CheckpointError: ", "does not fit the model"),
             (("--resume", "other_size.pth"), "CheckpointError: ", "cls_token [1, 1, 32] vs [1, 1, 128]")]
    for i, (flags, start, part) in enumerate(cases):
        flag, name = flags
        code, errors = run_pretrain(world, str(tmp_path / f"out{i}"), flag, str(tmp_path / name), caplog=caplog)
        assert code == 2 and len(errors) == 1, (flags, errors)
        assert errors[0].startswith(start) and part in errors[0] and "\n" not in errors[0], (flags, errors[0])


def test_allow_partial_flag_and_config_key(world: str, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from engine.config import COMMON_DEFAULTS

    assert COMMON_DEFAULTS["allow_partial"] is False
    state = {k: v for k, v in toy_pretrain_model().state_dict().items() if not k.startswith("itm_head")}
    torch.save({"model": state}, tmp_path / "no_itm.pth")
    code, errors = run_pretrain(world, str(tmp_path / "strict"), "--checkpoint", str(tmp_path / "no_itm.pth"),
                                caplog=caplog)
    assert code == 2 and "missing: itm_head.* (2 keys, e.g. itm_head.weight)" in errors[0] and "--allow_partial" in \
        errors[0]
    code, errors = run_pretrain(world, str(tmp_path / "partial"), "--checkpoint", str(tmp_path / "no_itm.pth"),
                                "--allow_partial", caplog=caplog)
    assert code == 0 and not errors and "allow_partial: suspicious keys" in caplog.text
    ckpt = torch.load(tmp_path / "partial" / "checkpoint_00.pth", weights_only=True)
    assert ckpt["meta"]["task"] == "pretrain" and ckpt["meta"]["image_res"] == 32
    set_allow_partial(False)


def test_evaluation_adopts_the_checkpoint_s_own_sizes_unless_overridden(tmp_path) -> None:
    import Retrieval
    from engine.config import load_config

    config = load_config(os.path.join(ROOT, "configs", "toy", "Retrieval.yaml"), Retrieval.DEFAULTS, ["toy_world=''"])
    model = ALBEFRetrieval(tiny_albef(image_res=48))
    path = str(tmp_path / "c.pth")
    torch.save({"model": model.state_dict(), "meta": checkpoint_meta(model, config, "Retrieval.py")}, path)
    adopted = adopt_checkpoint_sizes(config, path, [], str(tmp_path))
    assert adopted["image_res"] == 48 and adopted["vision_width"] == 32 and adopted["embed_dim"] == 16
    assert adopted["vit"] == {"patch_size": 8, "depth": 2, "heads": 2}
    assert BertConfig.from_json(adopted["bert_config"]) == model.config.bert
    assert ALBEFConfig.from_config(adopted).bert == model.config.bert and config["image_res"] == 64
    kept = adopt_checkpoint_sizes(config, path, ["image_res=64", "vit.depth=4"], str(tmp_path))
    assert kept["image_res"] == 64 and kept["vit"] == config["vit"] and kept["embed_dim"] == 16
    torch.save({"model": model.state_dict()}, str(tmp_path / "released.pth"))  # no metadata: the config's
    assert adopt_checkpoint_sizes(config, str(tmp_path / "released.pth"), [], str(tmp_path)) == config
