#!/usr/bin/env bash
# Zero-shot retrieval recipes (REFERENCE_NOTES 3C.10).
#
#   scripts/retrieval_zero_shot.sh flickr      COCO_FINETUNED.pth [NPROC] [KEY=VALUE ...]
#       the paper's zero-shot Flickr30K (Table 3): the COCO-fine-tuned model on the Flickr30K test split
#   scripts/retrieval_zero_shot.sh pretrained  PRETRAINED.pth     [NPROC] [KEY=VALUE ...]
#       a pre-trained checkpoint on Flickr30K, at the 256 px it was trained at (salesforce/ALBEF#25)
#
# KEY=VALUE pairs are config overrides, e.g. image_root=/data/flickr30k/ k_test=0 (ITC-only ranking).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:?usage: $0 flickr|pretrained CHECKPOINT [NPROC] [KEY=VALUE ...]}
checkpoint=${2:?checkpoint path required}
nproc=${3:-1}
shift $(( $# < 3 ? $# : 3 ))

case "$mode" in
  flickr) overrides=("$@") ;;
  pretrained) overrides=(image_res=256 "$@") ;;
  *) echo "unknown mode $mode (flickr | pretrained)" >&2; exit 2 ;;
esac
args=(--config configs/Retrieval_flickr.yaml --output_dir "output/zero_shot_${mode}" --checkpoint "$checkpoint"
      --evaluate)
if [ ${#overrides[@]} -gt 0 ]; then args+=(--override "${overrides[@]}"); fi
torchrun --nproc_per_node="$nproc" Retrieval.py "${args[@]}"
