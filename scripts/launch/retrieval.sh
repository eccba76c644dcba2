#!/usr/bin/env bash
# Image-text retrieval fine-tuning (paper Sec. 5, Table 2): COCO or Flickr30K from the pre-trained ALBEF.pth,
# 384 px, then the best epoch (val r_mean) on test.
#
#   IMAGE_ROOT=/data/coco/ scripts/launch/retrieval.sh coco
#   IMAGE_ROOT=/data/flickr30k/ scripts/launch/retrieval.sh flickr
#
# CHECKPOINT (default ALBEF.pth), IMAGE_ROOT (the images; else the config's image_root), OUTPUT
# (output/retrieval_<dataset>), common.sh. Zero-shot Flickr30K: scripts/retrieval_zero_shot.sh; evaluating a
# released mscoco.pth / flickr30k.pth: scripts/launch/evaluate.sh.
source "$(dirname "$0")/common.sh"
dataset=${1:?usage: $0 coco|flickr [KEY=VALUE ...] [-- FLAGS]}
shift
case "$dataset" in coco | flickr) ;; *) echo "unknown dataset $dataset (coco | flickr)" >&2; exit 2 ;; esac
split_args "$@"
if [ -n "${IMAGE_ROOT:-}" ]; then overrides=("image_root=$IMAGE_ROOT" ${overrides[@]+"${overrides[@]}"}); fi
launch Retrieval.py --config "configs/Retrieval_${dataset}.yaml" --output_dir "${OUTPUT:-output/retrieval_$dataset}" \
  --checkpoint "${CHECKPOINT:-ALBEF.pth}"
