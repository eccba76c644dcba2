# Shared by the launchers in this folder (sourced, not run). The paper's recipes run on one node of 8 GPUs:
#
#   NPROC        processes (GPUs) per node, default 8
#   NNODES       nodes, default 1; with more, also NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500)
#   PYTHON       the interpreter, default python3 (torchrun is `$PYTHON -m torch.distributed.run`)
#   OUTPUT       the run's output folder (each launcher has its default under output/)
#   DRY_RUN=1    print the command instead of running it
#
# Arguments after the launcher's own are config overrides KEY=VALUE (e.g. image_root=/data/coco/) or, after
# `--`, flags for the entry script (e.g. -- --resume).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# split "$@" into overrides (before --) and extra flags (after --)
split_args() {
  overrides=()
  flags=()
  local seen=0
  for arg in "$@"; do
    if [ "$arg" = "--" ]; then seen=1; continue; fi
    if [ $seen -eq 1 ]; then flags+=("$arg"); else overrides+=("$arg"); fi
  done
}

# launch SCRIPT ARGS...: torchrun the entry script on NPROC processes (per node)
launch() {
  local cmd=("${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node="${NPROC:-8}")
  if [ "${NNODES:-1}" -gt 1 ]; then
    cmd+=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?NODE_RANK is required with NNODES > 1}"
          --master_addr="${MASTER_ADDR:?MASTER_ADDR is required with NNODES > 1}"
          --master_port="${MASTER_PORT:-29500}")
  else
    cmd+=(--standalone)
  fi
  cmd+=("$@")
  if [ ${#flags[@]} -gt 0 ]; then cmd+=("${flags[@]}"); fi
  if [ ${#overrides[@]} -gt 0 ]; then cmd+=(--override "${overrides[@]}"); fi
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
  else
    "${cmd[@]}"
  fi
}
