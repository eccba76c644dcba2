#!/usr/bin/env bash
# Weakly supervised grounding on RefCOCO+ (paper Sec. 6.4, Table 5): retrieval fine-tuning on the expressions,
# Grad-CAM proposal ranking each epoch (val_d picks the best).
#
#   IMAGE_ROOT=/data/coco/ REFCOCO_DATA=/data/refer DET_FILE=/data/dets.json scripts/launch/grounding.sh
#
# CHECKPOINT (default ALBEF.pth), IMAGE_ROOT, REFCOCO_DATA (the refer folder), DET_FILE (dets.json), CONFIG
# (configs/Grounding.yaml), OUTPUT (output/grounding), common.sh. Flags of Grounding.py after --, e.g.
# -- --gradcam_mode itc --block_num 8.
source "$(dirname "$0")/common.sh"
split_args "$@"
if [ -n "${IMAGE_ROOT:-}" ]; then overrides=("image_root=$IMAGE_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
if [ -n "${REFCOCO_DATA:-}" ]; then overrides=("refcoco_data=$REFCOCO_DATA" ${overrides[@]+"${overrides[@]}"}); fi
if [ -n "${DET_FILE:-}" ]; then overrides=("det_file=$DET_FILE" ${overrides[@]+"${overrides[@]}"}); fi
launch Grounding.py --config "${CONFIG:-configs/Grounding.yaml}" --output_dir "${OUTPUT:-output/grounding}" \
  --checkpoint "${CHECKPOINT:-ALBEF.pth}"
