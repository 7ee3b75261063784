#!/usr/bin/env bash
# Show, follow or fetch the training log (~/train.log) of TPU VM workers.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/logs.sh --name=NAME --zone=ZONE [options]

  --name=NAME         node name (required; NAME-i for slice i of a multislice run)
  --zone=ZONE         zone of the TPU VM (required)
  --project=PROJECT   Google Cloud project
  --worker=W          worker index, or 'all' (default: 0, which logs metrics)
  --lines=N           last N lines (default: 100)
  --follow            keep streaming new lines (Ctrl-C stops; training goes on)
  --fetch=DIR         copy the worker's ~/train.log to DIR/NAME-wW.log instead
  --dry-run           print the commands instead of running them
  -h, --help          this help
USAGE
}

NAME="" ZONE="" PROJECT="" WORKER=0 LINES=100 FOLLOW=0 FETCH=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --follow) FOLLOW=1; shift ;;
    --name|--name=*) flag_value name "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --zone|--zone=*) flag_value zone "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --project|--project=*) flag_value project "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    --worker|--worker=*) flag_value worker "$@"; WORKER=$VALUE; shift "$SHIFT" ;;
    --lines|--lines=*) flag_value lines "$@"; LINES=$VALUE; shift "$SHIFT" ;;
    --fetch|--fetch=*) flag_value fetch "$@"; FETCH=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', got '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
scope=(--zone="$ZONE" --worker="$WORKER")
[[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")

if [[ -n "$FETCH" ]]; then
  [[ "$WORKER" != all ]] || die "--fetch copies one worker's log; give --worker=N"
  run mkdir -p "$FETCH"
  run gcloud compute tpus tpu-vm scp "$NAME:train.log" "$FETCH/$NAME-w$WORKER.log" "${scope[@]}"
else
  tail_args="-n $LINES"
  (( FOLLOW )) && tail_args+=" -F"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --command="tail $tail_args ~/train.log"
fi
