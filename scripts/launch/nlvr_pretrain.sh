#!/usr/bin/env bash
# Text-assignment (TA) pre-training for NLVR2 (paper Sec. 5): one epoch on the pre-training data, from ALBEF.pth,
# 12 -> 18 text-encoder layers. Its checkpoint_00.pth is the CHECKPOINT of scripts/launch/nlvr.sh.
#
#   CHECKPOINT=ALBEF.pth scripts/launch/nlvr_pretrain.sh train_file=[data/coco.json,data/vg.json,...]
#
# CHECKPOINT (default ALBEF.pth), CONFIG (configs/NLVR_pretrain.yaml), OUTPUT (output/nlvr_pretrain), common.sh.
source "$(dirname "$0")/common.sh"
split_args "$@"
launch Pretrain_nlvr.py --config "${CONFIG:-configs/NLVR_pretrain.yaml}" \
  --output_dir "${OUTPUT:-output/nlvr_pretrain}" --checkpoint "${CHECKPOINT:-ALBEF.pth}"
