"""A seeded, offline synthetic "toy world" for ALBEF demos, tests and CI.

Each image shows 1-4 coloured shapes on a light background (rendered with Pillow). Captions
describe the whole composition, so retrieval needs every object. The generator writes the
annotation files of every downstream task in the official ALBEF formats (REFERENCE_NOTES 1.1):

    images/{train,val,test}/NNNNN.png   ve_images/<image_id>.jpg
    pretrain.json            [{"image": ABSOLUTE path, "caption": [str, ...]}], ~10% noisy
    pretrain_binding.json    the same plus 3 captions per image naming some of its objects
    pretrain_regions.json    region descriptions: per training image, one item naming one object per caption,
                             one naming a shape with its count or the number of objects (with pretrain.json,
                             the pre-training that NLVR2's toy runs start from; README)
    retrieval_train.json     [{"image": rel, "caption": str, "image_id": "train_NNNNN"}]
    retrieval_{val,test}.json [{"image": rel, "caption": [5 x str]}]
    vqa_train.json, vqa_test.json, vqa_test_answers.json, answer_list.json
    nlvr_{train,val,test}.json, ve_{train,val,test}.json
    nlvr_train_extra.json    3 more NLVR2 training statements per training image (their own rng)
    grounding_train.json, grounding_test.json, dets.json, refs.json (JSON stand-in for REFER)
    grounding_train_full.json  one item per training object naming it in full ("the small red star")
    scenes.json              per-image object records (shape, colour, size, bbox) and captions
    manifest.json            parameters, counts, version (written last)

Modules: `dataset.toy_scene` (vocabulary, objects, scenes), `dataset.toy_render` (placement and
drawing), `dataset.toy_captions` (captions, pre-training and retrieval files), `dataset.toy_tasks`
(VQA, NLVR2, SNLI-VE files), `dataset.toy_grounding` (grounding files); this module samples the
splits, writes the files and installs the world atomically.

Usage: ``python -m dataset.toy_world --root data/toy`` or ``ensure_toy_world("data/toy")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dataset.toy_captions import build_binding_captions, build_captions, build_region_captions
from dataset.toy_grounding import build_grounding
from dataset.toy_render import render_scene, sample_scene
from dataset.toy_scene import Scene
from dataset.toy_tasks import build_nlvr, build_ve, build_vqa

logger = logging.getLogger(__name__)

# Bumped when a generated file changes, so that worlds written by older code are regenerated (2: dets.json
# distractors overlap no object at IoU >= 0.5; 3: pretrain_binding.json; 4: grounding_train_full.json;
# 5: nlvr_train_extra.json; 6: pretrain_regions.json).
VERSION = 6


# ----------------------------------------------------------------------------- writing
def _scenes(seed: int, counts: dict[str, int], image_size: int) -> dict[str, list[Scene]]:
    """All scenes, with integer ids 0..N-1 in split order.

    Val/test scenes get object signatures unique within their split where possible, so each
    retrieval query has one right image.
    """
    rng = random.Random(seed)
    out: dict[str, list[Scene]] = {}
    image_id = 0
    for split, n in counts.items():
        out[split], seen = [], set()
        for index in range(n):
            for _ in range(50):
                scene = sample_scene(rng, image_id, split, index, image_size)
                signature = frozenset((o.color, o.shape, o.size) for o in scene.objects)
                if split == "train" or signature not in seen:
                    break
            seen.add(signature)
            out[split].append(scene)
            image_id += 1
    return out


def _write_images(tmp: Path, scenes: dict[str, list[Scene]], image_size: int, seed: int) -> None:
    (tmp / "ve_images").mkdir(parents=True)
    for split, split_scenes in scenes.items():
        (tmp / "images" / split).mkdir(parents=True)
        for scene in split_scenes:
            image = render_scene(scene, image_size, seed)
            image.save(tmp / scene.image, format="PNG", compress_level=1)
            image.save(tmp / "ve_images" / f"{scene.image_id}.jpg", format="JPEG", quality=95)


def _annotation_files(
    scenes: dict[str, list[Scene]], root: Path, params: dict[str, int]
) -> dict[str, object]:
    seed = params["seed"]
    files = build_captions(scenes, root, seed)
    train, val, test = scenes["train"], scenes["val"], scenes["test"]
    files["pretrain_binding.json"] = build_binding_captions(files["pretrain.json"], train,
                                                            random.Random(f"{seed}-binding"))
    files["pretrain_regions.json"] = build_region_captions(train, root)
    files.update(build_vqa(train, [*val, *test], random.Random(f"{seed}-vqa")))
    for split, split_scenes in scenes.items():
        rng = random.Random(f"{seed}-{split}")
        files[f"nlvr_{split}.json"] = build_nlvr(split_scenes, len(split_scenes), rng)
        files[f"ve_{split}.json"] = build_ve(split_scenes, rng)
    # Its own rng, so every file above stays as version 4 wrote it.
    files["nlvr_train_extra.json"] = build_nlvr(train, 3 * len(train), random.Random(f"{seed}-nlvr-extra"))
    files.update(
        build_grounding(train, val, test, params["image_size"], random.Random(f"{seed}-ground"))
    )
    return files


def _generate(tmp: Path, root: Path, params: dict[str, int]) -> None:
    counts = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    scenes = _scenes(params["seed"], counts, params["image_size"])
    _write_images(tmp, scenes, params["image_size"], params["seed"])
    files = _annotation_files(scenes, root, params)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content), encoding="utf-8")
    manifest = {
        "generator": "dataset.toy_world",
        "version": VERSION,
        "params": params,
        "images": counts,
        "counts": {name: len(content) for name, content in files.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------- entry points
def _read_manifest(root: Path) -> dict:
    """The world's ``manifest.json``; ``{}`` when it is missing or unreadable (an absent or partial world)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _manifest_matches(root: Path, params: dict[str, int]) -> bool:
    return _read_manifest(root).get("params") == params


def _install(tmp: Path, root: Path, params: dict[str, int]) -> None:
    """Rename the finished world into place; only a stale toy world (or empty dir) is replaced."""
    if root.exists():
        if _manifest_matches(root, params):  # another process finished first
            return
        if any(root.iterdir()) and not (root / "manifest.json").exists():
            raise FileExistsError(f"{root} exists and is not a toy world; refusing to overwrite it")
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        root.rename(stale / "world")
        tmp.rename(root)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        try:
            tmp.rename(root)
        except OSError:
            if not _manifest_matches(root, params):  # lost a race to a different world
                raise


# The project's data folder: where the shipped toy configs expect the world (engine.config.resolve_path).
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "data" / "toy"


def ensure_toy_world(
    root: str,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 200,
    n_test: int = 250,
    image_size: int = 64,
) -> str:
    """Generate the toy world in `root` unless a complete one with these parameters exists.

    The world is built in a temporary directory next to `root` and renamed into place, so an
    interrupted run never leaves a partial world. Returns the absolute root path.
    """
    root_path = Path(root).expanduser().resolve()
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": image_size,
        "version": VERSION,
    }
    if _manifest_matches(root_path, params):
        logger.info("toy world already present at %s", root_path)
        return str(root_path)
    if min(n_train, n_val, n_test) < 2 or image_size < 32:
        raise ValueError("need at least 2 images per split and image_size >= 32")
    start = time.perf_counter()
    root_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root_path.name}.tmp-", dir=root_path.parent))
    try:
        _generate(tmp, root_path, params)
        _install(tmp, root_path, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("toy world written to %s in %.1fs", root_path, time.perf_counter() - start)
    return str(root_path)


def is_current_toy_world(root: str) -> bool:
    """Whether `root` holds a complete toy world written by this generator's VERSION."""
    return _read_manifest(Path(root)).get("version") == VERSION


def ensure_current_toy_world(root: str) -> str:
    """The toy world in `root`: generated with the default parameters when absent, regenerated with its own
    parameters when an older generator wrote it (a newer VERSION adds or changes files, so a config naming a new
    file works on a world written before it existed). Returns the absolute root path."""
    params = _read_manifest(Path(root)).get("params")
    keys = ("seed", "n_train", "n_val", "n_test", "image_size")
    if not isinstance(params, dict) or not all(k in params for k in keys):
        return ensure_toy_world(root)
    return ensure_toy_world(root, **{k: params[k] for k in keys})


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Generate the offline ALBEF toy world.")
    parser.add_argument("--root", default=str(DEFAULT_ROOT),
                        help="where to write it (default: the project's data/toy, wherever this is started)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--n_test", type=int, default=250)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return ensure_toy_world(
        args.root, args.seed, args.n_train, args.n_val, args.n_test, args.image_size
    )


if __name__ == "__main__":
    main()
