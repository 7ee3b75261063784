#!/usr/bin/env bash
# Request a Cloud TPU VM slice (or several, for multislice) as a queued resource and wait for it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/create.sh --name=NAME --accelerator-type=TYPE --zone=ZONE [options]

Creates a queued resource NAME holding one TPU VM slice (node NAME), or with --num-slices=N
the nodes NAME-0 ... NAME-(N-1) for multislice training, then waits until it is ACTIVE.

  --name=NAME               queued-resource and node name (required)
  --accelerator-type=TYPE   e.g. v5litepod-16, v5p-128, v6e-8, v4-32 (required)
  --zone=ZONE               e.g. us-east5-a (required)
  --runtime-version=V       TPU VM image (default: v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5
                            for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
  --project=PROJECT         Google Cloud project (default: gcloud's configured project)
  --spot                    TPU Spot VMs (cheaper; may be preempted at any time)
  --preemptible             best-effort (preemptible) capacity instead of spot
  --num-slices=N            multislice: N slices of TYPE joined over the data-center network
  --workers=N               check that TYPE has N worker hosts (exit 2 if not)
  --no-wait                 return once the request is queued
  --dry-run                 print the gcloud commands instead of running them
  -h, --help                this help
USAGE
}

NAME="" TYPE="" ZONE="" RUNTIME="" PROJECT="" TIER="" SLICES=1 WORKERS="" WAIT=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) TIER="--spot"; shift ;;
    --preemptible) TIER="--best-effort"; shift ;;
    --no-wait) WAIT=0; shift ;;
    --name|--name=*) flag_value name "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --accelerator-type|--accelerator-type=*) flag_value accelerator-type "$@"; TYPE=$VALUE; shift "$SHIFT" ;;
    --zone|--zone=*) flag_value zone "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --runtime-version|--runtime-version=*) flag_value runtime-version "$@"; RUNTIME=$VALUE; shift "$SHIFT" ;;
    --project|--project=*) flag_value project "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    --num-slices|--num-slices=*) flag_value num-slices "$@"; SLICES=$VALUE; shift "$SHIFT" ;;
    --workers|--workers=*) flag_value workers "$@"; WORKERS=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$TYPE" ]] || die "--accelerator-type is required (e.g. v5litepod-16, v5p-128)"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-east5-a); TPU types exist only in some zones"
tpu_chips "$TYPE" > /dev/null || exit 2
[[ -z "$WORKERS" ]] || check_workers "$TYPE" "$WORKERS"
[[ -n "$RUNTIME" ]] || RUNTIME=$(tpu_runtime "$TYPE")
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive number, got '$SLICES'"

args=(gcloud compute tpus queued-resources create "$NAME")
if (( SLICES > 1 )); then
  args+=(--node-count="$SLICES" --node-prefix="$NAME")
else
  args+=(--node-id="$NAME")
fi
args+=(--zone="$ZONE" --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
[[ -z "$PROJECT" ]] || args+=(--project="$PROJECT")
[[ -z "$TIER" ]] || args+=("$TIER")
run "${args[@]}"

(( WAIT )) || exit 0
describe=(gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE"
          --format='value(state.state)')
[[ -z "$PROJECT" ]] || describe+=(--project="$PROJECT")
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"  # Polled every 30 s until ACTIVE.
  exit 0
fi
while true; do
  state=$("${describe[@]}")
  echo "queued resource $NAME: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) die "queued resource $NAME is $state; see: ${describe[*]:0:6}" ;;
  esac
  sleep 30
done
