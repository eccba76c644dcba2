#!/usr/bin/env bash
# One pass over the CUDA code paths and the GPU benchmark, on a machine with one GPU.
#
#   scripts/gpu_check.sh OUT_DIR
#
# 1. toy pre-training, 1 epoch, bf16 autocast (SDPA, fused AdamW on CUDA), one process, no launcher;
# 2. the same under torchrun --nproc_per_node=1: DistributedDataParallel over NCCL;
# 3. toy retrieval fine-tuning from step 1's checkpoint, 1 epoch, then its val/test evaluation;
# 4. the other tasks the same way, 1 epoch each under bf16 autocast with their evaluations: VQA, SNLI-VE, NLVR2
#    text assignment and then NLVR2 from it, grounding (Grad-CAM on CUDA);
# 5. scripts/benchmark.py on CUDA: pre-training step (ours under bf16 autocast, the official algorithm in
#    fp32), retrieval evaluation and fine-tuning step, data pipeline; the tables go to OUT_DIR/benchmark.log
#    and OUT_DIR/bench_cuda.json.
# Each step's log goes to OUT_DIR/NAME.log and the run stops at the first failure (its log's end is printed).
# Environment: PYTHON (default python3); DEVICE (default cuda; cpu runs the same steps here, as a dry run);
# BENCH_ARGS replaces the benchmark's arguments. A folder .whl of wheels (ruamel.yaml, say), if present, is
# installed first into a temporary site directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
bench_args=${BENCH_ARGS:---batch-full 64 --batch-tiny 256 --steps 10 --warmup 3 --eval-images-full 100}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .whl/*.whl
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, print the log's end
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if ! "$@" > "$out/$name.log" 2>&1; then
    tail -n 40 "$out/$name.log"
    echo "== $name FAILED after $((SECONDS - start)) s"
    exit 1
  fi
  tail -n 4 "$out/$name.log"
  echo "== $name ok in $((SECONDS - start)) s"
}

step environment "$py" -c "
import torch, timm, transformers
print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"
pre=(--override schedular.epochs=1 amp=bf16 itc_warmup_steps=20)  # 20 ITC-only steps, then the full objective
step toy_pretrain "$py" Pretrain.py --config configs/toy/Pretrain.yaml --output_dir "$work/pretrain" \
  --device "$device" "${pre[@]}"
step toy_pretrain_ddp "$py" -m torch.distributed.run --standalone --nproc_per_node=1 Pretrain.py \
  --config configs/toy/Pretrain.yaml --output_dir "$work/pretrain_ddp" --device "$device" "${pre[@]}"
step toy_retrieval "$py" Retrieval.py --config configs/toy/Retrieval.yaml --output_dir "$work/retrieval" \
  --checkpoint "$work/pretrain/checkpoint_00.pth" --device "$device" --override schedular.epochs=1 amp=bf16
ft=(--device "$device" --override schedular.epochs=1 amp=bf16)  # each task: 1 epoch under bf16 autocast
ckpt=(--checkpoint "$work/pretrain/checkpoint_00.pth")
step toy_vqa "$py" VQA.py --config configs/toy/VQA.yaml --output_dir "$work/vqa" "${ckpt[@]}" "${ft[@]}"
step toy_ve "$py" SNLI_VE.py --config configs/toy/VE.yaml --output_dir "$work/ve" "${ckpt[@]}" "${ft[@]}"
step toy_nlvr_ta "$py" Pretrain_nlvr.py --config configs/toy/NLVR_pretrain.yaml --output_dir "$work/nlvr_ta" \
  "${ckpt[@]}" "${ft[@]}"
step toy_nlvr "$py" NLVR.py --config configs/toy/NLVR.yaml --output_dir "$work/nlvr" \
  --checkpoint "$work/nlvr_ta/checkpoint_00.pth" "${ft[@]}"
step toy_grounding "$py" Grounding.py --config configs/toy/Grounding.yaml --output_dir "$work/grounding" \
  "${ckpt[@]}" "${ft[@]}"
# shellcheck disable=SC2086  # bench_args is a list of flags
step benchmark "$py" scripts/benchmark.py --device "$device" $bench_args --json "$out/bench_cuda.json"
cat "$out/benchmark.log"
