"""Run a trained ALBEF checkpoint on your images and texts: the command line of ``models.api``.

    python scripts/predict.py match --checkpoint CKPT --images a.png b.png --texts "a red circle" "two blue squares"
    python scripts/predict.py retrieve --checkpoint CKPT --texts "a red circle" --images photos/ --k 5
    python scripts/predict.py retrieve --checkpoint CKPT --query image --images a.png --texts "a cat" "a dog"
    python scripts/predict.py answer --checkpoint vqa.pth --images a.png --questions "what colour is the circle?"
    python scripts/predict.py classify --checkpoint CKPT --images a.png b.png --classes circle square star
    python scripts/predict.py classify --checkpoint CKPT --image_folder data/toy_shapes --templates "a {}."
    python scripts/predict.py pairs --checkpoint ve.pth --images a.png --texts "there is a circle"
    python scripts/predict.py gradcam --checkpoint CKPT --image a.png --text "a red circle" --output_dir out/cam

Each subcommand prints a table (``--json FILE`` also writes the results as JSON). ``--images`` takes files and
folders (every image inside, sorted). The checkpoint's own resolution, sizes and text preprocessing are used
(``models.api.load_model``); ``--task`` overrides its task (e.g. ``retrieval`` for a pre-training checkpoint).
``gradcam`` writes ``sentence.png``, ``word_NN_<token>.png`` and ``grid.png`` as ``scripts/visualize.py``.
``pairs`` is SNLI-VE ((image, hypothesis) -> entailment / neutral / contradiction) or NLVR2 (``--images`` in
pairs: a1 b1 a2 b2 ..., one statement per pair).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger("albef.predict")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expand_images(paths: list[str]) -> list[str]:
    """Files as given; folders -> their image files, sorted."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        else:
            out.append(path)
    return out


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, columns padded to their widest cell; floats with 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


# ----------------------------------------------------------------------------- subcommands
def run_match(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    images = expand_images(args.images)
    out = albef.match(images, args.texts)
    rows = [[img, txt, out["itm"][i, j].item(), out["itc"][i, j].item()]
            for i, img in enumerate(images) for j, txt in enumerate(args.texts)]
    return table(["image", "text", "itm_prob", "itc_sim"], rows), {
        "images": images, "texts": args.texts, "itm": out["itm"].tolist(), "itc": out["itc"].tolist()}


def run_retrieve(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    images = expand_images(args.images)
    if args.query == "text":
        query, gallery = args.texts, albef.index(images=images)
    else:
        query, gallery = images, albef.index(texts=args.texts)
    hits = albef.retrieve(query, gallery, k=args.k, k_test=args.k_test, score=args.score)
    rows = [[q, rank + 1, hit["item"], hit["score"], hit["itc"]] for q, found in zip(query, hits)
            for rank, hit in enumerate(found)]
    return table(["query", "rank", "match", "score", "itc_sim"], rows), {
        "query": args.query, "results": [{"query": q, "hits": found} for q, found in zip(query, hits)]}


def run_answer(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    images = expand_images(args.images)
    if len(images) == 1 and len(args.questions) > 1:
        images = images * len(args.questions)  # one image, several questions
    found = albef.answer(images, args.questions, candidates=args.candidates, top_n=args.top_n)
    rows = [[img, q, rank + 1, a, p] for img, q, answers in zip(images, args.questions, found)
            for rank, (a, p) in enumerate(answers)]
    return table(["image", "question", "rank", "answer", "prob"], rows), {
        "results": [{"image": i, "question": q, "answers": a} for i, q, a in zip(images, args.questions, found)]}


def run_classify(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    if args.image_folder:
        metrics = albef.evaluate_folder(args.image_folder, args.templates, args.rerank)
        rows = [[name, f"{acc:.2f}"] for name, acc in metrics["per_class_acc"].items()]
        rows.append(["all", f"{metrics['acc']:.2f} (chance {metrics['chance']:.2f}, majority "
                            f"{metrics['majority']:.2f}, n {metrics['n']})"])
        return table(["class", "accuracy %"], rows), metrics
    if not args.images or not args.classes:
        raise SystemExit("classify needs --image_folder, or --images and --classes")
    images = expand_images(args.images)
    out = albef.classify(images, args.classes, args.templates, rerank=args.rerank, top_n=args.top_n)
    rows = [[img, rank + 1, name, score] for img, top in zip(images, out["top"]) for rank, (name, score) in
            enumerate(top)]
    return table(["image", "rank", "class", "score"], rows), {
        "images": images, "classes": out["classes"], "top": out["top"], "predictions": out["predictions"]}


def run_pairs(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    images = expand_images(args.images)
    if albef.task == "nlvr":
        images = list(zip(images[0::2], images[1::2]))
    found = albef.classify_pairs(images, args.texts)
    rows = [[str(img), txt, out["label"], *out["probs"].values()] for img, txt, out in zip(images, args.texts, found)]
    names = list(found[0]["probs"]) if found else []
    return table(["image", "text", "label", *names], rows), {
        "results": [{"image": img, "text": t, **out} for img, t, out in zip(images, args.texts, found)]}


def run_gradcam(albef: Any, args: argparse.Namespace) -> tuple[str, dict]:
    from PIL import Image

    from dataset.image_io import load_image
    from scripts.visualize import write_pictures

    out = albef.gradcam(args.image, args.text, mode=args.mode, block_num=args.block_num)
    source = load_image(args.image)
    scale = args.display_size / max(source.size)
    picture = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.BICUBIC)
    paths = write_pictures(picture, out["map"].numpy(), [(t, m.numpy()) for t, m in out["words"]], out["text"],
                           args.output_dir)
    rows = [[os.path.basename(p)] for p in paths]
    return table([f"written to {args.output_dir} (score {out['score']:.4f})"], rows), {
        "score": out["score"], "text": out["text"], "map": out["map"].tolist(), "files": paths}


COMMANDS = {"match": run_match, "retrieve": run_retrieve, "answer": run_answer, "classify": run_classify,
            "pairs": run_pairs, "gradcam": run_gradcam}


# ----------------------------------------------------------------------------- command line
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this project or a released one")
    parser.add_argument("--task", default=None, help="override the checkpoint's task (pretrain, retrieval, vqa, ...)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"), help="autocast on CUDA")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the checkpoint's evaluation batch")
    parser.add_argument("--allow_partial", action="store_true", help="load despite suspicious missing keys")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("match", help="ITM probability and ITC similarity of every (image, text) pair")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p = sub.add_parser("retrieve", help="texts -> images (default) or images -> texts: ITC shortlist, ITM rerank")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p.add_argument("--query", choices=("text", "image"), default="text", help="which side asks (the other is searched)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--k_test", type=int, default=None, help="ITC shortlist reranked by ITM (0: ITC only)")
    p.add_argument("--score", choices=("itm", "itm+itc"), default="itm")
    p = sub.add_parser("answer", help="VQA: the best answers of each (image, question)")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--questions", nargs="+", required=True)
    p.add_argument("--candidates", nargs="+", default=None, help="default: the checkpoint config's answer_list")
    p.add_argument("--top_n", type=int, default=5)
    p = sub.add_parser("classify", help="zero-shot classification by ITC (accuracy over an ImageFolder directory)")
    p.add_argument("--images", nargs="+", default=None)
    p.add_argument("--classes", nargs="+", default=None)
    p.add_argument("--image_folder", default=None, help="root/<class>/<image>: report the accuracy")
    p.add_argument("--templates", nargs="+", default=["a photo of a {}."], help="prompts; {} is the class name")
    p.add_argument("--rerank", type=int, default=0, help="reorder the best N classes by ITM")
    p.add_argument("--top_n", type=int, default=3)
    p = sub.add_parser("pairs", help="SNLI-VE / NLVR2 predictions")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p = sub.add_parser("gradcam", help="Grad-CAM PNGs of one (image, text)")
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--mode", choices=("itm", "itc"), default="itm")
    p.add_argument("--block_num", type=int, default=None, help="default: models.gradcam.default_block")
    p.add_argument("--display_size", type=int, default=256, help="longer side of the pictures (pixels)")
    for action in sub.choices.values():
        _common(action)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run one subcommand; prints its table and returns the results (also written to ``--json``)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from models.api import load_model

    albef = load_model(args.checkpoint, task=args.task, device=args.device, amp=args.amp,
                       batch_size=args.batch_size, allow_partial=args.allow_partial)
    text, results = COMMANDS[args.command](albef, args)
    sys.stdout.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    from engine.trainer import run_main  # one line for a bad checkpoint, exit code 2

    try:
        sys.exit(run_main(main))
    except ValueError as exc:  # a call the checkpoint's task cannot answer, inputs that do not pair up
        sys.exit(f"predict.py: {exc}")
