"""Run ``Pretrain.main`` with a probe on every training step, for the multi-process tests.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py RECORD Pretrain.py-arguments...
    python tests/ddp_probe.py RECORD Pretrain.py-arguments...

Each rank writes ``RECORD.rank{r}.pt``: one entry per step with the batch's captions and per-image pixel
sums, alpha, this rank's (not all-reduced) losses, the feature queues and their pointer right after the
step's enqueue, and the ITC-only parameters (``vision_proj``, ``text_proj``, ``temp``) as they were before
the step's update. Image augmentation is replaced by the deterministic test transform (resize + normalise),
so that a sample gives the same image tensor in every run whatever the rank's random stream.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import Pretrain  # noqa: E402
from dataset import build_transform  # noqa: E402
from engine import epochs, trainer  # noqa: E402

ITC_ONLY = ("vision_proj.weight", "text_proj.weight", "temp")


def deterministic_transform(kind: str, image_res: int, **_: object) -> Callable:
    """The evaluation transform whatever ``kind`` is asked for: no random crop, flip or RandAugment."""
    return build_transform("test", image_res)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The feature queues and their pointer of the (unwrapped) model, copied to the CPU."""
    state = epochs.unwrap(model).state_dict()
    keys = ("image_queue", "text_queue", "queue_ptr")
    return {k: state[k].detach().cpu().clone() for k in keys}


def probing(make_step_fn: Callable, records: list[dict]) -> Callable:
    """Wrap ``Pretrain.make_step_fn`` so every step appends its record to ``records``."""

    def make(tokenizer: object, config: dict, device: torch.device) -> Callable:
        step = make_step_fn(tokenizer, config, device)

        def probed(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
            params = dict(epochs.unwrap(model).named_parameters())
            before = {k: params[k].detach().cpu().clone() for k in ITC_ONLY}
            losses = step(model, batch, alpha, global_step)
            image, captions = batch
            records.append(
                {
                    "captions": list(captions),
                    "image_sums": image.flatten(1).sum(1),
                    "alpha": alpha,
                    "params_before": before,
                    "losses": {k: float(v.detach()) for k, v in losses.items()},
                    **snapshot(model),
                }
            )
            return losses

        return probed

    return make


def main(argv: list[str]) -> int:
    """``argv``: the record path, then Pretrain.py's arguments; returns Pretrain's exit code."""
    record_path, args = argv[0], argv[1:]
    records: list[dict] = []
    Pretrain.make_step_fn = probing(Pretrain.make_step_fn, records)
    Pretrain.build_transform = deterministic_transform
    rank = int(os.environ.get("RANK", "0"))  # read before run_main tears the process group down
    code = trainer.run_main(lambda: Pretrain.main(args))
    torch.save(records, f"{record_path}.rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
