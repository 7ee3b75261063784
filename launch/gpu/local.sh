#!/usr/bin/env bash
# Train on every GPU of this machine: one process for all GPUs, or one process per GPU.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=SCRIPTDIR/xla_flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/xla_flags.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu/local.sh --workdir=DIR [options] -- TRAIN_ARGS

  --workdir=DIR     checkpoints and metrics (required)
  --gpus=N          GPUs to use (default: all that nvidia-smi lists)
  --mode=MODE       per-node: one process drives all GPUs (default);
                    per-gpu: N processes on 127.0.0.1, one GPU each (process i logs to
                    DIR/process_i.log; process 0 also to the terminal)
  --port=P          coordinator port for per-gpu (default: 12355)
  --python=PY       interpreter (default: python)
  --no-xla-flags    leave XLA_FLAGS as it is (default: the flags of launch/gpu/xla_flags.txt
                    first, then those already in XLA_FLAGS, which win; see docs/gpu.md)
  --dry-run         print the commands instead of running them
  -h, --help        this help
USAGE
}

WORKDIR="" GPUS="" MODE="per-node" PORT=12355 PY=python XLA=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-xla-flags) XLA=0; shift ;;
    --) shift; break ;;
    --workdir|--workdir=*) flag_value workdir "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --gpus|--gpus=*) flag_value gpus "$@"; GPUS=$VALUE; shift "$SHIFT" ;;
    --mode|--mode=*) flag_value mode "$@"; MODE=$VALUE; shift "$SHIFT" ;;
    --port|--port=*) flag_value port "$@"; PORT=$VALUE; shift "$SHIFT" ;;
    --python|--python=*) flag_value python "$@"; PY=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1' (training arguments go after --)" ;;
  esac
done
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ $# -gt 0 ]] || die "no training arguments; give them after --, e.g. -- --config=configs/demo.py"
[[ "$MODE" == per-node || "$MODE" == per-gpu ]] || die "--mode must be per-node or per-gpu, got '$MODE'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
visible=""
if command -v nvidia-smi > /dev/null; then
  visible=$(nvidia-smi -L | grep -c '^GPU' || true)
fi
if [[ -z "$GPUS" ]]; then
  [[ -n "$visible" ]] || die "no nvidia-smi here to count GPUs; give --gpus=N"
  GPUS=$visible
fi
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive number, got '$GPUS'"
[[ -z "$visible" ]] || (( GPUS <= visible )) || die "--gpus=$GPUS but only $visible GPU(s) are visible"
xla=()
if [[ "$XLA" == 1 ]]; then
  flags=$(gpu_xla_flags) || exit 2
  xla=(XLA_FLAGS="$flags")
fi

if [[ "$MODE" == per-node ]]; then
  run env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $(( GPUS - 1 )))" "${xla[@]}" \
    "$PY" -m transformer.main --workdir="$WORKDIR" "$@"
  exit 0
fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$WORKDIR"
pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT
for (( i = 0; i < GPUS; i++ )); do
  cmd=(env CUDA_VISIBLE_DEVICES="$i" JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
       JAX_NUM_PROCESSES="$GPUS" JAX_PROCESS_ID="$i" "${xla[@]}" "$PY" -m transformer.main
       --workdir="$WORKDIR" "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${cmd[@]}"
  elif (( i == 0 )); then
    "${cmd[@]}" 2>&1 | tee "$WORKDIR/process_0.log" &
    pids+=($!)
  else
    "${cmd[@]}" > "$WORKDIR/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit "$status"
