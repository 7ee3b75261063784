#!/usr/bin/env bash
# Submit a multi-node GPU training job to SLURM (one process per GPU, or per node).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=SCRIPTDIR/xla_flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/xla_flags.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu/slurm.sh --nodes=N --workdir=DIR [options] -- TRAIN_ARGS

Submits launch/gpu/train.sbatch, which runs `srun python -m transformer.main --workdir=DIR
TRAIN_ARGS` on every task; jax.distributed.initialize() finds the peers from SLURM. The job
gets XLA_FLAGS from this environment (sbatch's default --export=ALL).

  --nodes=N             nodes (required)
  --workdir=DIR         checkpoints and metrics, on a filesystem every node shares (required)
  --gpus-per-node=G     GPUs per node (default: 8)
  --mode=MODE           per-gpu: one process per GPU (default); per-node: one per node
  --partition=P         SLURM partition
  --account=A           SLURM account
  --time=T              time limit, e.g. 24:00:00
  --job-name=NAME       (default: transformer)
  --no-xla-flags        leave XLA_FLAGS as it is (default: the flags of launch/gpu/xla_flags.txt
                        first, then those already in XLA_FLAGS, which win; see docs/gpu.md)
  --dry-run             print the sbatch command (and the srun line the job runs)
  -h, --help            this help
USAGE
}

NODES="" WORKDIR="" GPUS=8 MODE="per-gpu" PARTITION="" ACCOUNT="" TIME="" JOB="transformer" XLA=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-xla-flags) XLA=0; shift ;;
    --) shift; break ;;
    --nodes|--nodes=*) flag_value nodes "$@"; NODES=$VALUE; shift "$SHIFT" ;;
    --workdir|--workdir=*) flag_value workdir "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --gpus-per-node|--gpus-per-node=*) flag_value gpus-per-node "$@"; GPUS=$VALUE; shift "$SHIFT" ;;
    --mode|--mode=*) flag_value mode "$@"; MODE=$VALUE; shift "$SHIFT" ;;
    --partition|--partition=*) flag_value partition "$@"; PARTITION=$VALUE; shift "$SHIFT" ;;
    --account|--account=*) flag_value account "$@"; ACCOUNT=$VALUE; shift "$SHIFT" ;;
    --time|--time=*) flag_value time "$@"; TIME=$VALUE; shift "$SHIFT" ;;
    --job-name|--job-name=*) flag_value job-name "$@"; JOB=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1' (training arguments go after --)" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got '${NODES}'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive number, got '$GPUS'"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a directory every node can write)"
[[ $# -gt 0 ]] || die "no training arguments; give them after --, e.g. -- --config=configs/gpt2_pretrain.py"
case "$MODE" in
  per-gpu) tasks=$GPUS ;;
  per-node) tasks=1 ;;
  *) die "--mode must be per-gpu or per-node, got '$MODE'" ;;
esac

SCRIPT="$(dirname "${BASH_SOURCE[0]}")/train.sbatch"
args=(sbatch --job-name="$JOB" --nodes="$NODES" --ntasks-per-node="$tasks" --gpus-per-node="$GPUS")
[[ -z "$PARTITION" ]] || args+=(--partition="$PARTITION")
[[ -z "$ACCOUNT" ]] || args+=(--account="$ACCOUNT")
[[ -z "$TIME" ]] || args+=(--time="$TIME")
args+=(--output="$WORKDIR/slurm-%j.out" "$SCRIPT" --workdir="$WORKDIR" "$@")
if [[ "$XLA" == 1 ]]; then
  flags=$(gpu_xla_flags) || exit 2
  args=(env XLA_FLAGS="$flags" "${args[@]}")
fi
if [[ "$DRY_RUN" == 1 ]]; then
  run "${args[@]}"
  printf -v srun '%q ' srun --kill-on-bad-exit=1 python -m transformer.main --workdir="$WORKDIR" "$@"
  echo "# the job runs on $(( NODES * tasks )) task(s): ${srun% }"
  exit 0
fi
mkdir -p "$WORKDIR"
"${args[@]}"
