#!/usr/bin/env bash
# Evaluate a released (or your own fine-tuned) checkpoint on its task's val and test splits (--evaluate).
#
#   scripts/launch/evaluate.sh retrieval_coco mscoco.pth image_root=/data/coco/
#   scripts/launch/evaluate.sh retrieval_flickr flickr30k.pth image_root=/data/flickr30k/
#   scripts/launch/evaluate.sh vqa vqa.pth vqa_root=/data/coco/ vg_root=/data/visual_genome/
#   scripts/launch/evaluate.sh nlvr nlvr.pth image_root=/data/nlvr2/
#   scripts/launch/evaluate.sh ve ve.pth image_root=/data/flickr30k/
#   scripts/launch/evaluate.sh grounding refcoco.pth image_root=/data/coco/ -- --gradcam_mode itc --block_num 8
#
# TASK CHECKPOINT [KEY=VALUE ...] [-- FLAGS]; OUTPUT (default output/eval_<task>), common.sh (NPROC: 8).
source "$(dirname "$0")/common.sh"
task=${1:?usage: $0 TASK CHECKPOINT [KEY=VALUE ...] [-- FLAGS]; TASK: retrieval_coco retrieval_flickr vqa nlvr ve grounding}
checkpoint=${2:?checkpoint path required}
shift 2
case "$task" in
  retrieval_coco) script=Retrieval.py; config=configs/Retrieval_coco.yaml ;;
  retrieval_flickr) script=Retrieval.py; config=configs/Retrieval_flickr.yaml ;;
  vqa) script=VQA.py; config=configs/VQA.yaml ;;
  nlvr) script=NLVR.py; config=configs/NLVR.yaml ;;
  ve) script=SNLI_VE.py; config=configs/VE.yaml ;;
  grounding) script=Grounding.py; config=configs/Grounding.yaml ;;
  *) echo "unknown task $task (retrieval_coco retrieval_flickr vqa nlvr ve grounding)" >&2; exit 2 ;;
esac
split_args "$@"
launch "$script" --config "${CONFIG:-$config}" --output_dir "${OUTPUT:-output/eval_$task}" --checkpoint "$checkpoint" \
  --evaluate
