"""Check a task's config and data before training: the checks the task script runs at start-up, all at once.

Usage (from the repository root)::

    python scripts/validate_data.py --config configs/Pretrain.yaml
    python scripts/validate_data.py --config configs/Retrieval_coco.yaml --check-images --override k_test=128
    python scripts/validate_data.py --config configs/Pretrain.yaml --world-size 8   # for an 8-process run

The task is inferred from the config (the task schema that accepts its keys; the file name breaks ties) unless
``--task`` names it. The config is read with the task script's own schema and ``--override`` handling, then
checked with ``engine.checks`` (value ranges, relations between keys, the task's own checks, the files a
training run needs), and every annotation file is read: every problem of a file is listed (up to
``--max-listed``, then a count), and the split sizes are checked against the batch size. A config that passes
also starts. Exits 1 if any problem is found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine import checks  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402

logger = logging.getLogger("validate_data")

# task -> entry script module; tasks whose script is not in the checkout are skipped
TASKS = {"pretrain": "Pretrain", "retrieval": "Retrieval", "vqa": "VQA", "ve": "SNLI_VE", "nlvr": "NLVR",
         "nlvr_pretrain": "Pretrain_nlvr", "grounding": "Grounding"}
# tasks whose annotation files dataset.validate knows how to read
FILE_TASKS = ("pretrain", "retrieval", "grounding", "ve", "nlvr", "nlvr_pretrain", "vqa")
# file-name stems that name a task (configs/Retrieval_coco.yaml -> retrieval)
STEMS = {"pretrain": "pretrain", "retrieval": "retrieval", "vqa": "vqa", "ve": "ve", "snli_ve": "ve",
         "nlvr": "nlvr", "nlvr_pretrain": "nlvr_pretrain", "grounding": "grounding"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="task YAML config")
    parser.add_argument("--task", choices=sorted(TASKS), default=None, help="default: inferred from the config")
    parser.add_argument("--override", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the task scripts take them")
    parser.add_argument("--check-images", action="store_true", help="also decode every referenced image")
    parser.add_argument("--world-size", type=int, default=1, help="processes of the planned run (default 1)")
    parser.add_argument("--max-listed", type=int, default=20, help="problems listed per file before a count")
    parser.add_argument("--evaluate", action="store_true", help="the run only evaluates: no training file needed")
    return parser.parse_args(argv)


def task_module(task: str) -> ModuleType | None:
    """The entry script of ``task``, or None when the checkout has none."""
    if not (REPO_ROOT / f"{TASKS[task]}.py").is_file():
        return None
    return importlib.import_module(TASKS[task])


def _readable(path: str) -> None:
    """Raise the ``ConfigError`` of a missing file or a YAML syntax error (any schema gives the same)."""
    try:
        load_config(path, {}, [])
    except ConfigError as exc:
        if "unknown config key" not in str(exc):
            raise


def infer_task(path: str, overrides: list[str]) -> str:
    """The task whose schema accepts the config (several: the one the file name names). Raises ConfigError."""
    _readable(path)  # unreadable file, YAML syntax: one error, not one per task
    fits, errors = [], []
    for task in TASKS:
        module = task_module(task)
        if module is None:
            continue
        try:
            load_config(path, module.DEFAULTS, overrides)
            fits.append(task)
        except ConfigError as exc:
            errors.append(f"{task}: {str(exc).removeprefix(path + ': ')}")
    if len(fits) == 1:
        return fits[0]
    stem = Path(path).stem.lower()
    named = [t for s, t in STEMS.items() if t in fits and (stem == s or stem.startswith(s + "_"))]
    if len(set(named)) == 1:
        return named[0]
    if not fits:
        raise ConfigError(f"{path} fits no task's schema ({'; '.join(errors)}); pass --task")
    raise ConfigError(f"{path} fits the schemas of {', '.join(fits)}; pass --task")


def config_and_problems(args: argparse.Namespace) -> tuple[str, dict | None, list[str]]:
    """(task, config, problems) of the config alone: schema, value rules, relations, task checks, needed files."""
    task = args.task or infer_task(args.config, args.override)
    module = task_module(task)
    if module is None:
        raise ConfigError(f"task {task}: {TASKS[task]}.py is not in this checkout")
    config = load_config(args.config, module.DEFAULTS, args.override)
    hooks = [*getattr(module, "CONFIG_CHECKS", ())]
    if not args.evaluate:
        hooks += getattr(module, "TRAINING_CHECKS", ())
    return task, config, checks.config_problems(config, hooks)


def _all_in(config: dict, folder: Path) -> bool:
    """Whether every configured ``*_file`` lies in ``folder``."""
    files = []
    for key, value in config.items():
        if key.endswith("_file"):
            files += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
    return bool(files) and all(folder in Path(f).resolve().parents for f in files)


def data_problems(task: str, config: dict, args: argparse.Namespace) -> list[str]:
    """Every problem of the task's annotation files, then the split sizes against the batch size."""
    from dataset.task_files import task_file_report

    if task not in FILE_TASKS:
        logger.info("task %s: its annotation files are checked when the script starts", task)
        return []
    from dataset.toy_world import is_current_toy_world

    world = config.get("toy_world")
    if world and not is_current_toy_world(world) and _all_in(config, Path(world).resolve()):
        logger.info("the toy world %s is (re)generated on the first run: its files are checked then", world)
        return []
    sizes, problems = task_file_report(config, task, check_images=args.check_images, limit=args.max_listed)
    if args.evaluate:
        sizes.pop("train", None)
    given = {split: n for split, n in sizes.items() if config.get(f"{split}_file")}
    return problems + checks.size_problems(config, given, args.world_size)


def one_line(text: str) -> str:
    """Collapse a multi-line message (a YAML error with its context) into one line."""
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Validate ``--config``; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        task, config, problems = config_and_problems(args)
    except ConfigError as exc:
        logger.error("%s", one_line(exc))
        return 1
    problems += data_problems(task, config, args)
    for problem in problems:
        logger.error("%s", one_line(problem))
    if problems:
        logger.error("%d problem(s) found in the %s config and data of %s", len(problems), task, args.config)
        return 1
    logger.info("the %s config %s and its data files are valid", task, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
