#!/usr/bin/env bash
# ALBEF pre-training (paper Sec. 4: ViT-B/16 + BERT-base, 256 px, 8 x 64 images, 30 epochs).
#
#   VIT_INIT=deit_base_patch16_224-b5f2ef4d.pth BERT_INIT=/path/to/bert-base-uncased \
#       scripts/launch/pretrain.sh train_file=[data/coco.json,data/vg.json,data/cc3m.json,data/sbu.json]
#
# VIT_INIT: the DeiT-B/16 ImageNet checkpoint; BERT_INIT: a bert-base-uncased folder (or Hugging Face cache id);
# leave both empty to train from scratch. CONFIG (configs/Pretrain.yaml), OUTPUT (output/pretrain) and the
# variables of common.sh. Continue a stopped run with `scripts/launch/pretrain.sh ... -- --resume`.
source "$(dirname "$0")/common.sh"
split_args "$@"
args=(Pretrain.py --config "${CONFIG:-configs/Pretrain.yaml}" --output_dir "${OUTPUT:-output/pretrain}")
if [ -n "${VIT_INIT:-}" ]; then overrides=("vit_init=$VIT_INIT" ${overrides[@]+"${overrides[@]}"}); fi
if [ -n "${BERT_INIT:-}" ]; then
  overrides=("bert_init=true" ${overrides[@]+"${overrides[@]}"})
  args+=(--text_encoder "$BERT_INIT")
fi
launch "${args[@]}"
