"""Check a task's annotation files (and optionally its images) before training.

Usage (from the repository root)::

    python scripts/validate_data.py --config configs/Pretrain.yaml --task pretrain
    python scripts/validate_data.py --config configs/Retrieval_coco.yaml --task retrieval --check-images

Exits with status 1 if any problem is found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ruamel.yaml import YAML  # noqa: E402

from dataset.validate import validate_config_files  # noqa: E402

logger = logging.getLogger("validate_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="task YAML config")
    parser.add_argument("--task", required=True, choices=["pretrain", "retrieval"])
    parser.add_argument(
        "--check-images", action="store_true", help="also decode every referenced image"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the files of ``--config`` for ``--task``; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        with open(args.config, encoding="utf-8") as f:
            config = YAML(typ="safe").load(f)
    except Exception as err:  # noqa: BLE001 - report any YAML/IO failure as one line
        logger.error("cannot read config %s: %s", args.config, err)
        return 1
    if not isinstance(config, dict):
        logger.error("config %s: top level must be a mapping", args.config)
        return 1
    problems = validate_config_files(config, args.task, check_images=args.check_images)
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        logger.error(
            "%d problem(s) found in the %s data of %s",
            len(problems),
            args.task,
            args.config,
        )
        return 1
    logger.info("all %s data files of %s are valid", args.task, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
