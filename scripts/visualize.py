"""Grad-CAM pictures of an ALBEF checkpoint (paper Figs. 4-6; official ``visualization.ipynb``).

Usage (from the repository root)::

    python scripts/visualize.py --config configs/toy/Grounding.yaml \\
        --checkpoint output/toy_grounding/checkpoint_best.pth --image data/toy/images/test/00003.png \\
        --text "the circle above the purple diamond" --output_dir output/gradcam

writes ``sentence.png`` (the sentence-level map over the image), ``word_NN_<token>.png`` (one per text token,
the same Grad-CAM restricted to that token; ``itm`` mode only) and ``grid.png`` (the image, the sentence map and
every token map, with the words as titles). Any checkpoint with the ITM head and the contrastive projections
works: pre-training, retrieval or grounding. The model architecture comes from ``--config`` (the keys
``bert_config``, ``image_res``, ``vision_width``, ``vit``, ``embed_dim``) or else from the config saved in the
checkpoint.

A VQA checkpoint (one with ``text_decoder`` weights; paper Fig. 5) has no ITM head: ``--text`` is the question
and the map explains an answer, ``--answer`` or else the top-ranked answer of ``--answer_list`` (a JSON list, as
VQA.py's ``answer_list``), by the gradient of its log-likelihood (``models.gradcam.answer_gradcam``; ``itm``
mode only)::

    python scripts/visualize.py --config configs/toy/VQA.yaml --checkpoint output/toy_vqa/checkpoint_04.pth \
        --image data/toy/images/test/00003.png --text "what color is the circle" \
        --answer_list data/toy/answer_list.json --output_dir output/gradcam_vqa

The overlay follows the notebook's ``getAttMap``: the map scaled to [0, 1], resized bicubically to the picture,
blurred (Gaussian, sigma = 0.02 x the longer side), scaled again, coloured with the jet colour map and blended
as ``(1 - a**0.7) * image + a**0.7 * colour``. Rendering uses numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from ruamel.yaml import YAML  # noqa: E402

from dataset.caption import pre_caption, pre_question  # noqa: E402
from dataset.image_io import load_image  # noqa: E402
from dataset.transforms import build_transform  # noqa: E402
from models.albef import ALBEFConfig  # noqa: E402
from models.checkpoint import CheckpointError, load_weights, read_state_dict  # noqa: E402
from models.gradcam import MODES, answer_gradcam, gradcam  # noqa: E402
from models.model_retrieval import ALBEFRetrieval  # noqa: E402
from models.model_vqa import ALBEFVQA  # noqa: E402
from models.tokenizer import TextTokenizer  # noqa: E402
from models.vqa_rank import tokenize_answers  # noqa: E402

logger = logging.getLogger("albef.visualize")
TITLE_HEIGHT = 18


# ----------------------------------------------------------------------------- rendering
def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian (H, W) with mirrored borders, truncated at 4 sigma (scipy's ``gaussian_filter``)."""
    radius = int(4 * sigma + 0.5)
    if radius < 1:
        return a
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(a, pad, mode="symmetric")
        a = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return a


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    peak = a.max()
    return a / peak if peak > 0 else a


def jet(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB in [0, 1] (H, W, 3), the jet colour map (blue - cyan - yellow - red)."""
    return np.clip(1.5 - np.abs(4.0 * a[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(image: Image.Image, heat: np.ndarray, blur: bool = True) -> Image.Image:
    """Blend a (G, G) map over an RGB picture (the notebook's ``getAttMap``)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
    h, w = rgb.shape[:2]
    a = _unit(np.asarray(heat, dtype=np.float32))
    a = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    if blur:
        a = _gaussian_blur(a, 0.02 * max(h, w))
        a = _unit(a)
    a = np.clip(a, 0.0, 1.0)  # bicubic resizing over- and undershoots a little
    weight = a[..., None] ** 0.7
    out = (1.0 - weight) * rgb + weight * jet(a)
    return Image.fromarray(np.uint8(np.clip(out, 0.0, 1.0) * 255 + 0.5))


def titled(tile: Image.Image, title: str) -> Image.Image:
    """The tile under a white strip carrying ``title``."""
    out = Image.new("RGB", (tile.width, tile.height + TITLE_HEIGHT), "white")
    out.paste(tile, (0, TITLE_HEIGHT))
    ImageDraw.Draw(out).text((3, 3), title, fill="black")
    return out


def grid_picture(tiles: list[Image.Image], columns: int = 4) -> Image.Image:
    """Equal-size tiles in rows of ``columns`` on a white background, 4 px apart."""
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    out = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + 4) + 4), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile, (4 + (i % columns) * (w + 4), 4 + (i // columns) * (h + 4)))
    return out


# ----------------------------------------------------------------------------- maps
def text_maps(model: ALBEFRetrieval, tokenizer: TextTokenizer, image: torch.Tensor, text: str, mode: str = "itm",
              block_num: int | None = None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One image (3, R, R) and text -> the sentence map (G, G) and, in ``itm`` mode, ``[(token, map (G, G))]``
    for every token after [CLS] (the notebook's per-word pictures)."""
    caption = pre_caption(text, 30)
    batch = tokenizer([caption], max_length=model.config.bert.max_position_embeddings)
    device = next(model.parameters()).device
    out = gradcam(model, image[None].to(device), batch.input_ids.to(device), batch.attention_mask.to(device),
                  mode=mode, block_num=block_num)
    return _maps(out, tokenizer, batch.input_ids[0])


def _maps(out: dict[str, torch.Tensor], tokenizer: TextTokenizer,
          input_ids: torch.Tensor) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Grad-CAM output of one text -> the sentence map and ``[(token, map)]`` after [CLS] (if token maps exist)."""
    sentence = out["map"][0].float().cpu().numpy()
    words = []
    if "token_maps" in out:
        tokens = tokenizer.backend.convert_ids_to_tokens(input_ids.tolist())
        maps = out["token_maps"][0].float().cpu().numpy()
        words = [(token, maps[i]) for i, token in enumerate(tokens) if i > 0]
    return sentence, words


def pick_answer(model: ALBEFVQA, tokenizer: TextTokenizer, image: torch.Tensor, question: str,
                answer_list: list[str], k: int = 128) -> str:
    """The top-ranked answer of ``answer_list`` for one image (3, R, R) and cleaned question (``model.rank``)."""
    device = next(model.parameters()).device
    q = tokenizer([question], max_length=model.config.bert.max_position_embeddings).to(device)
    answers = tokenize_answers(tokenizer, answer_list).to(device)
    ranked, _ = model.eval().rank(image[None].to(device), q.input_ids, q.attention_mask, answers.input_ids,
                                  answers.attention_mask, min(k, len(answer_list)))
    return answer_list[int(ranked[0, 0])]


def vqa_maps(model: ALBEFVQA, tokenizer: TextTokenizer, image: torch.Tensor, question: str, answer: str,
             block_num: int | None = None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One image (3, R, R), cleaned question and answer -> the question map (G, G) and one map per question
    token, by the gradient of the answer's log-likelihood (:func:`models.gradcam.answer_gradcam`)."""
    device = next(model.parameters()).device
    q = tokenizer([question], max_length=model.config.bert.max_position_embeddings).to(device)
    a = tokenize_answers(tokenizer, [answer]).to(device)
    out = answer_gradcam(model, image[None].to(device), q.input_ids, q.attention_mask, a.input_ids,
                         a.attention_mask, block_num)
    return _maps(out, tokenizer, q.input_ids[0])


def write_pictures(picture: Image.Image, sentence: np.ndarray, words: list[tuple[str, np.ndarray]], text: str,
                   output_dir: str) -> list[str]:
    """Write ``sentence.png``, ``word_NN_<token>.png`` and ``grid.png``; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    sentence_tile = overlay(picture, sentence)
    tiles = [titled(picture, "image"), titled(sentence_tile, text[:40])]
    sentence_tile.save(path := os.path.join(output_dir, "sentence.png"))
    paths.append(path)
    for i, (token, heat) in enumerate(words, start=1):
        tile = overlay(picture, heat)
        safe = re.sub(r"[^A-Za-z0-9]+", "", token) or "token"
        tile.save(path := os.path.join(output_dir, f"word_{i:02d}_{safe}.png"))
        paths.append(path)
        tiles.append(titled(tile, token))
    grid_picture(tiles).save(path := os.path.join(output_dir, "grid.png"))
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------- command line
def load_model(config_path: str | None, checkpoint: str, device: torch.device) -> ALBEFRetrieval | ALBEFVQA:
    """The ALBEF model of ``--config`` (or of the checkpoint's saved config) with the checkpoint's weights: the
    VQA model for a checkpoint with ``text_decoder`` weights, else the retrieval model (ITM head, projections)."""
    state, ckpt = read_state_dict(checkpoint)
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            config = YAML(typ="safe").load(f)
    elif isinstance(ckpt.get("config"), dict):
        config = ckpt["config"]
    else:
        raise ValueError(f"{checkpoint} holds no config: pass --config")
    if any(key.startswith("text_decoder.") for key in state):
        model = ALBEFVQA(ALBEFConfig.from_config(config), decoder_layers=config.get("decoder_layers") or None)
    else:
        model = ALBEFRetrieval(ALBEFConfig.from_config(config))
    load_weights(model, state)
    return model.to(device).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", default=None, help="YAML with the model keys (default: the checkpoint's)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--text", required=True, help="the text, or the question of a VQA checkpoint")
    parser.add_argument("--answer", default=None, help="VQA checkpoints: the answer the map explains")
    parser.add_argument("--answer_list", default=None,
                        help="VQA checkpoints without --answer: a JSON list of answers; the top-ranked one is used")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--gradcam_mode", default="itm", choices=MODES)
    parser.add_argument("--block_num", type=int, default=None, help="default: models.gradcam.default_block")
    parser.add_argument("--text_encoder", default="bert-base-uncased")
    parser.add_argument("--display_size", type=int, default=256, help="longer side of the pictures (pixels)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def vqa_question_answer(args: argparse.Namespace, model: ALBEFVQA, tokenizer: TextTokenizer,
                        image: torch.Tensor) -> tuple[str, str]:
    """The cleaned question (``pre_question``, 50 words as at VQA test time) and the answer to explain."""
    if args.gradcam_mode != "itm":
        raise ValueError(f"a VQA checkpoint has no contrastive projections: --gradcam_mode {args.gradcam_mode} needs "
                         "a pre-training, retrieval or grounding checkpoint (VQA maps are itm-style)")
    question = pre_question(args.text, 50)
    if args.answer:
        return question, args.answer
    if not args.answer_list:
        raise ValueError("a VQA checkpoint needs --answer (the answer the map explains) or --answer_list (its "
                         "top-ranked answer is used)")
    with open(args.answer_list, encoding="utf-8") as f:
        answer = pick_answer(model, tokenizer, image, question, json.load(f))
    logger.info("answer to %r: %r (top of %s)", question, answer, args.answer_list)
    return question, answer


def main(argv: list[str] | None = None) -> list[str]:
    """Write the pictures; returns their paths."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    model = load_model(args.config, args.checkpoint, device)
    source = load_image(args.image)
    image = build_transform("test", model.config.image_res)(source)
    tokenizer = TextTokenizer(args.text_encoder)
    if isinstance(model, ALBEFVQA):
        question, answer = vqa_question_answer(args, model, tokenizer, image)
        sentence, words = vqa_maps(model, tokenizer, image, question, answer, args.block_num)
        title = f"{question}: {answer}"
    else:
        if args.answer or args.answer_list:
            raise ValueError("--answer and --answer_list are for VQA checkpoints; this one has an ITM head")
        sentence, words = text_maps(model, tokenizer, image, args.text, args.gradcam_mode, args.block_num)
        title = pre_caption(args.text, 30)
    scale = args.display_size / max(source.size)
    picture = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.BICUBIC)
    paths = write_pictures(picture, sentence, words, title, args.output_dir)
    logger.info("wrote %s", ", ".join(paths))
    return paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, CheckpointError) as exc:  # one line, no traceback
        logger.error("%s", exc)
        sys.exit(2)
