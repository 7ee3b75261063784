#!/usr/bin/env bash
# Run the same training command on every worker of a TPU VM slice (or of every slice).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/run.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/DIR [options] -- TRAIN_ARGS

Runs `python -m transformer.main --workdir=gs://... TRAIN_ARGS` on all workers (--worker=all)
at once, with --config.distributed.num_processes set to the slice's worker count (times the
slices): each process then finds its peers through the TPU VM metadata.
The output of every worker streams here and is kept in ~/train.log on each worker.

  --name=NAME               node name (required)
  --zone=ZONE               zone of the TPU VM (required)
  --workdir=gs://B/DIR      checkpoints and metrics; every host must reach it (required)
  --project=PROJECT         Google Cloud project
  --accelerator-type=TYPE   the slice's type, e.g. v5p-128 (required: gives the worker count)
  --workers=N               check that TYPE has N worker hosts (exit 2 if not)
  --num-slices=N            multislice: run on NAME-0 ... NAME-(N-1), joined over DCN
                            (use a mesh whose 'data' axis is a multiple of N)
  --detach                  start in the background (nohup) and return; see logs.sh
  --dry-run                 print the commands instead of running them
  -h, --help                this help

Example:
  launch/tpu/run.sh --name=gpt2 --zone=us-east5-a --accelerator-type=v5p-64 \
      --workdir=gs://my-bucket/gpt2 -- \
      --config=configs/gpt2_pretrain.py --config.num_train_steps=100000
USAGE
}

NAME="" ZONE="" PROJECT="" WORKDIR="" TYPE="" WORKERS="" SLICES=1 DETACH=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --detach) DETACH=1; shift ;;
    --) shift; break ;;
    --name|--name=*) flag_value name "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --zone|--zone=*) flag_value zone "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --project|--project=*) flag_value project "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    --workdir|--workdir=*) flag_value workdir "$@"; WORKDIR=$VALUE; shift "$SHIFT" ;;
    --accelerator-type|--accelerator-type=*) flag_value accelerator-type "$@"; TYPE=$VALUE; shift "$SHIFT" ;;
    --workers|--workers=*) flag_value workers "$@"; WORKERS=$VALUE; shift "$SHIFT" ;;
    --num-slices|--num-slices=*) flag_value num-slices "$@"; SLICES=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1' (training arguments go after --)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$WORKDIR" == gs://?* ]] || die "--workdir must be on GCS (gs://BUCKET/DIR): every worker writes its part of each checkpoint there"
[[ $# -gt 0 ]] || die "no training arguments; give them after --, e.g. -- --config=configs/gpt2_pretrain.py"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive number, got '$SLICES'"
[[ -n "$TYPE" ]] || die "--accelerator-type is required (e.g. v5p-128): it gives the worker count"
hosts=$(tpu_hosts "$TYPE") || exit 2
[[ -z "$WORKERS" ]] || check_workers "$TYPE" "$WORKERS"

printf -v train "%q " "--workdir=$WORKDIR" "$@" "--config.distributed.num_processes=$(( hosts * SLICES ))"
train="cd ~/transformer && ~/venv/bin/python -m transformer.main ${train% }"
if (( DETACH )); then
  train="nohup bash -c $(printf %q "$train") > ~/train.log 2>&1 < /dev/null &"
else
  train="set -o pipefail; $train 2>&1 | tee ~/train.log"
fi
scope=(--zone="$ZONE" --worker=all)
[[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")

if (( SLICES == 1 )); then
  run gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --command="$train"
  exit 0
fi
# Multislice: every slice learns the coordinator (worker 0 of slice 0) and its own slice id.
describe=(gcloud compute tpus tpu-vm describe "$NAME-0" --zone="$ZONE"
          --format='value(networkEndpoints[0].ipAddress)')
[[ -z "$PROJECT" ]] || describe+=(--project="$PROJECT")
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  # shellcheck disable=SC2016  # Printed literally: the address the command above returns.
  coordinator='$COORDINATOR_IP'
else
  coordinator=$("${describe[@]}")
fi
pids=()
for (( i = 0; i < SLICES; i++ )); do
  env="MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8080 MEGASCALE_NUM_SLICES=$SLICES"
  env+=" MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=8080"
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus tpu-vm ssh "$NAME-$i" "${scope[@]}" --command="export $env; $train"
  else
    gcloud compute tpus tpu-vm ssh "$NAME-$i" "${scope[@]}" --command="export $env; $train" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
