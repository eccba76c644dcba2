#!/usr/bin/env bash
# NLVR2 fine-tuning (paper Sec. 5, Table 4) from the text-assignment checkpoint (scripts/launch/nlvr_pretrain.sh);
# dev picks the best epoch, evaluated on test-P.
#
#   IMAGE_ROOT=/data/nlvr2/ scripts/launch/nlvr.sh
#
# CHECKPOINT (default output/nlvr_pretrain/checkpoint_00.pth; ALBEF.pth skips TA), IMAGE_ROOT, CONFIG
# (configs/NLVR.yaml), OUTPUT (output/nlvr), common.sh.
source "$(dirname "$0")/common.sh"
split_args "$@"
if [ -n "${IMAGE_ROOT:-}" ]; then overrides=("image_root=$IMAGE_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
launch NLVR.py --config "${CONFIG:-configs/NLVR.yaml}" --output_dir "${OUTPUT:-output/nlvr}" \
  --checkpoint "${CHECKPOINT:-output/nlvr_pretrain/checkpoint_00.pth}"
