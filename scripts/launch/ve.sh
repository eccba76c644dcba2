#!/usr/bin/env bash
# SNLI-VE fine-tuning (paper Sec. 5, Table 4) from ALBEF.pth; val picks the best epoch, evaluated on test.
#
#   IMAGE_ROOT=/data/flickr30k/ scripts/launch/ve.sh
#
# CHECKPOINT (default ALBEF.pth), IMAGE_ROOT (Flickr30K images), CONFIG (configs/VE.yaml), OUTPUT (output/ve),
# common.sh.
source "$(dirname "$0")/common.sh"
split_args "$@"
if [ -n "${IMAGE_ROOT:-}" ]; then overrides=("image_root=$IMAGE_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
launch SNLI_VE.py --config "${CONFIG:-configs/VE.yaml}" --output_dir "${OUTPUT:-output/ve}" \
  --checkpoint "${CHECKPOINT:-ALBEF.pth}"
