"""Text-assignment (TA) pre-training for NLVR2 (paper Sec. 5, official ``Pretrain_nlvr.py``).

    python Pretrain_nlvr.py --config configs/toy/NLVR_pretrain.yaml --output_dir output/toy_nlvr_ta \
        --checkpoint output/toy_pretrain/checkpoint_15.pth
    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
        --output_dir output/nlvr_pretrain --checkpoint ALBEF.pth

Starts from a pre-training checkpoint whose 12-layer text encoder is mapped onto the 18-layer NLVR2 encoder
(each fusion layer copied into both blocks of its pair; ``models.checkpoint``). On the pre-training image-caption
data, each caption is shown with its own image and a hard negative in random order (label 0 / 1: which image
matches) or with two hard negatives (label 2), each label with probability 1/3; negatives are drawn from the
softmax of the image-image ITC similarity over the fixed temperature 0.07 (models/model_pretrain_nlvr.py). The
checkpoint of the last epoch (``checkpoint_<epochs - 1>.pth``, e.g. ``checkpoint_00.pth`` for the official
single epoch) is the ``--checkpoint`` of NLVR.py. There is no evaluation; ``log.txt`` has ``train_loss_ta`` and
``train_acc_ta`` per epoch.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, PRETRAIN_DATA_DEFAULTS, get_parser

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch

    from models.tokenizer import TextTokenizer

logger = logging.getLogger("albef.nlvr_pretrain")

# Every accepted key with its default; this dict is the schema (unknown keys are rejected).
DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    **PRETRAIN_DATA_DEFAULTS,
    "batch_size": 64,  # per GPU; at least 3 (two distinct negatives per caption)
    "max_words": 30,  # words kept by pre_caption
    "max_tokens": 25,  # tokenizer length incl. [CLS], truncated (official)
    "crop_scale": [0.2, 1.0],  # RandomResizedCrop scale (the pre-training transform)
    "randaug": True,  # RandomAugment(2, 7) after the crop and flip (official)
    "alpha": 0.0,  # no distillation in TA (the loop's alpha ramp does not apply)
    "warm_up": False,
    "optimizer": {"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02},
    "schedular": {"sched": "cosine", "lr": 2e-5, "epochs": 1, "min_lr": 1e-5, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0},
}


def ta_config_problems(config: dict) -> list[str]:
    """Task hook (``engine.checks``): two distinct negatives per caption need 3 images per process batch."""
    if config["batch_size"] < 3:
        return [f"batch_size {config['batch_size']}: text assignment draws two distinct negative images per "
                "caption, so it needs at least 3 images per process batch"]
    return []


def train_file_problems(config: dict) -> list[str]:
    """``train_file`` must name data."""
    from engine import checks

    return checks.files_given_problems(config, ["train_file"])


CONFIG_CHECKS = (ta_config_problems, train_file_problems)


def make_step_fn(tokenizer: TextTokenizer, config: dict, device: torch.device):
    """Batch -> ``{'loss_ta', 'acc_ta'}``. The batch is (images (B, 3, R, R), captions list[str])."""

    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        image, captions = batch
        text = tokenizer(captions, max_length=config["max_tokens"]).to(device, non_blocking=True)
        return model(image.to(device, non_blocking=True), text.input_ids, text.attention_mask)

    return step


def main(argv: list[str] | None = None) -> dict:
    """Run TA pre-training; returns the last epoch's record."""
    args = get_parser(__doc__).parse_args(argv)
    from dataset import build_pretrain_loader, build_transform
    from engine import checks, distributed, trainer
    from models.albef import ALBEFConfig
    from models.model_pretrain_nlvr import ALBEFPretrainNLVR
    from models.tokenizer import TextTokenizer

    config, device = trainer.setup_run(args, DEFAULTS, CONFIG_CHECKS)
    if not args.checkpoint and not args.resume:
        logger.warning("no --checkpoint: text assignment from randomly initialised encoders")
    tokenizer = TextTokenizer(args.text_encoder)
    transform = build_transform("pretrain", config["image_res"], crop_scale=tuple(config["crop_scale"]),
                                randaug=config["randaug"])
    # JSON files: the exact-resume JSON loader; any shard spec: the streaming shard loader (it logs the sizes)
    loader = build_pretrain_loader(config, transform, args.seed, rank=distributed.get_rank(),
                                   world_size=distributed.get_world_size())
    checks.check_sizes(config, {"train": loader.sampler.dataset_len}, args.config, distributed.get_world_size())
    model = ALBEFPretrainNLVR(ALBEFConfig.from_config(config))
    return trainer.fit(model, loader, make_step_fn(tokenizer, config, device), config, args, device)


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
