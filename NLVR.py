"""ALBEF NLVR2: fine-tuning and evaluation (paper Sec. 5 and Fig. 3b, official ``NLVR.py``).

    python NLVR.py --config configs/toy/NLVR.yaml --output_dir output/toy_nlvr \
        --checkpoint output/toy_nlvr_ta/checkpoint_01.pth        # after text-assignment pre-training
    python NLVR.py --config configs/toy/NLVR.yaml --output_dir output/toy_nlvr_no_ta \
        --checkpoint output/toy_pretrain/checkpoint_15.pth       # straight from pre-training
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr \
        --checkpoint pretrain_model_nlvr.pth
    python NLVR.py --config configs/NLVR.yaml --output_dir output/nlvr_eval --checkpoint nlvr.pth --evaluate

The text encoder has 18 layers: each fusion layer is doubled, its first block attending to image 1 and its
second to image 2 (models/model_nlvr.py). A TA checkpoint (Pretrain_nlvr.py) loads as it is; a 12-layer
pre-training checkpoint is mapped onto the pairs, each fusion layer copied into both blocks, and the log says so
(the official script loads only its ViT, silently). A 2-way MLP head on [CLS], momentum distillation as SNLI-VE.

Momentum teacher: the official script copies the online weights into the twins *before* loading the checkpoint,
so twins the checkpoint lacks (the TA checkpoint has none) start from the random initialisation. Here they start
from the loaded weights (``teacher_init: loaded``, default); ``teacher_init: random`` reproduces the official run.
``eval_ema`` is accepted for the official config files and unused (as in the official code).

Each epoch evaluates dev (``val_file``; ``val_acc`` picks ``checkpoint_best.pth``); the best checkpoint is then
evaluated on test-P (``test_file``). Results in ``output_dir/result/nlvr_metrics.json`` and ``log.txt``; each
statement's label and prediction in ``result/nlvr_predictions.json`` (``scripts/toy_nlvr_kinds.py`` tabulates a toy
run's by kind of statement).
"""

from __future__ import annotations

import sys
from typing import Any

from engine.config import get_parser
from SNLI_VE import CLASSIFIER_DEFAULTS, run_classifier_task

NLVR_CLASS_NAMES = ("False", "True")

DEFAULTS: dict[str, Any] = {
    **CLASSIFIER_DEFAULTS,
    "train_file": [],  # JSON files of {images: [path0, path1], sentence, label: "True"/"False"}
    "val_file": [],  # dev
    "test_file": [],  # test-P
    "batch_size": 16,  # per GPU, training and evaluation
    "warm_up": True,  # ramp alpha over epoch 0
    "eval_ema": False,  # official key, unused (as in the official code)
    "schedular": {"sched": "cosine", "lr": 2e-5, "epochs": 10, "min_lr": 1e-6, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0},
}


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and/or evaluate on NLVR2; returns the results written to ``nlvr_metrics.json``."""
    args = get_parser(__doc__).parse_args(argv)
    from dataset import NLVRDataset  # here, not above: --help stays fast
    from models.model_nlvr import ALBEFNLVR

    return run_classifier_task(args, DEFAULTS, ALBEFNLVR, NLVRDataset, NLVR_CLASS_NAMES, "nlvr", "statements",
                               ("batch_size", "batch_size"))


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
