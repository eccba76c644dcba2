#!/usr/bin/env bash
# VQA fine-tuning (paper Sec. 5, Table 4) from ALBEF.pth: the answer decoder starts from the fusion layers; the
# test answers go to output_dir/result/vqa_result_epoch<E>.json for the evaluation server.
#
#   VQA_ROOT=/data/coco/ VG_ROOT=/data/visual_genome/ scripts/launch/vqa.sh
#
# CHECKPOINT (default ALBEF.pth), VQA_ROOT and VG_ROOT (image folders; else the config's), CONFIG
# (configs/VQA.yaml), OUTPUT (output/vqa), common.sh.
source "$(dirname "$0")/common.sh"
split_args "$@"
if [ -n "${VQA_ROOT:-}" ]; then overrides=("vqa_root=$VQA_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
if [ -n "${VG_ROOT:-}" ]; then overrides=("vg_root=$VG_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
launch VQA.py --config "${CONFIG:-configs/VQA.yaml}" --output_dir "${OUTPUT:-output/vqa}" \
  --checkpoint "${CHECKPOINT:-ALBEF.pth}"
