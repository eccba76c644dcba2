"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation.

    python Pretrain.py --config configs/toy/Pretrain.yaml --output_dir output/toy_pretrain
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from engine.config import COMMON_DEFAULTS, PRETRAIN_DATA_DEFAULTS, get_parser

if TYPE_CHECKING:  # torch, the models and the data are imported inside the functions: --help stays fast
    import torch

    from models.model_pretrain import ALBEFPretrain
    from models.tokenizer import TextTokenizer

logger = logging.getLogger("albef.pretrain")

# Every accepted key with its default; this dict is the schema (unknown keys are rejected).
DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    **PRETRAIN_DATA_DEFAULTS,
    "batch_size": 64,  # per GPU
    "temp": 0.07,
    "mlm_probability": 0.15,
    "queue_size": 65536,
    "momentum": 0.995,
    "alpha": 0.4,
    "max_words": 30,  # words kept by pre_caption
    "max_tokens": 25,  # tokenizer length incl. [CLS]
    "crop_scale": [0.2, 1.0],  # RandomResizedCrop scale
    "randaug": True,  # RandomAugment(2, 7) after the crop and flip (official)
    "warm_up": True,  # ramp alpha over epoch 0 (always on in the official pre-training)
    # first N steps: ITC alone on in-batch negatives, no queue (ITM and MLM skipped: half-cost steps).
    # 0 (official) when starting from DeiT/BERT weights; a model trained from scratch needs it.
    "itc_warmup_steps": 0,
    "vit_init": "",  # DeiT-B/16 ImageNet checkpoint (.pth) for the ViT, '' for none
    "bert_init": False,  # initialise BERT from --text_encoder (local folder or HF cache)
    # temp_lr_scale: lr multiplier of the learnable temperature (1: official)
    "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02, "temp_lr_scale": 1.0},
    "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 30, "min_lr": 1e-5, "decay_rate": 1,
                  "warmup_lr": 1e-5, "warmup_epochs": 20, "cooldown_epochs": 0},
}


def _training_problems(config: dict) -> list[str]:
    """Pre-training always trains: ``train_file`` names a file, and a batch holds an ITM hard negative."""
    from engine.checks import files_given_problems, itm_batch_problems

    return files_given_problems(config, ["train_file"]) + itm_batch_problems(config)


# The task's own start-up checks (``engine.checks`` hooks, besides the common rules); scripts/validate_data.py
# runs them too.
CONFIG_CHECKS = [_training_problems]


def build_transform(*args: Any, **kwargs: Any) -> Any:
    """``dataset.build_transform``, imported on first use."""
    from dataset import build_transform as build

    return build(*args, **kwargs)


def build_model(config: dict, tokenizer: TextTokenizer, text_encoder: str) -> ALBEFPretrain:
    """The pre-training model, initialised from DeiT / BERT weights when the config asks for it."""
    from models.albef import ALBEFConfig
    from models.checkpoint import init_from_pretrained
    from models.model_pretrain import ALBEFPretrain

    model = ALBEFPretrain(ALBEFConfig.from_config(config), tokenizer.pad_token_id, tokenizer.cls_token_id,
                          tokenizer.mask_token_id)
    init_from_pretrained(model, vit_init=config["vit_init"], bert_init=text_encoder if config["bert_init"] else "")
    return model


def make_step_fn(tokenizer: TextTokenizer, config: dict, device: torch.device):
    """Batch -> named losses. The batch is (images (B, 3, R, R), captions list[str])."""

    def step(model: torch.nn.Module, batch: tuple, alpha: float, global_step: int) -> dict[str, torch.Tensor]:
        image, captions = batch
        text = tokenizer(captions, max_length=config["max_tokens"]).to(device, non_blocking=True)
        return model(image.to(device, non_blocking=True), text.input_ids, text.attention_mask, alpha=alpha,
                     itc_warmup=global_step < config["itc_warmup_steps"])

    return step


def main(argv: list[str] | None = None) -> dict:
    """Run pre-training; returns the last epoch's averaged stats."""
    parser = get_parser(__doc__)
    args = parser.parse_args(argv)
    from engine.checks import reject_flags

    reject_flags(args, parser, {"evaluate": "pre-training only trains (evaluate a pre-trained checkpoint with "
                                            "Retrieval.py --evaluate)"}, "Pretrain.py")
    from dataset import build_pretrain_loader
    from engine import distributed, trainer
    from models.tokenizer import TextTokenizer

    config, device = trainer.setup_run(args, DEFAULTS, CONFIG_CHECKS)
    trainer.check_itm_batch(config["batch_size"], "batch_size")
    tokenizer = TextTokenizer(args.text_encoder)
    transform = build_transform("pretrain", config["image_res"], crop_scale=tuple(config["crop_scale"]),
                                randaug=config["randaug"])
    # JSON files: the exact-resume JSON loader; any shard spec: the streaming shard loader (it logs the sizes)
    loader = build_pretrain_loader(config, transform, args.seed, rank=distributed.get_rank(),
                                   world_size=distributed.get_world_size())
    model = build_model(config, tokenizer, args.text_encoder)
    return trainer.fit(model, loader, make_step_fn(tokenizer, config, device), config, args, device)


if __name__ == "__main__":
    get_parser(__doc__).parse_args()  # --help and usage errors answer before torch is imported
    from engine.trainer import run_main

    sys.exit(run_main(main))
