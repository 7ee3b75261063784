#!/usr/bin/env bash
# Delete a queued resource and its TPU VMs (billing stops; the GCS workdir stays).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/delete.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]

Deletes queued resource NAME with all its nodes (--force), without a confirmation prompt.
USAGE
}

NAME="" ZONE="" PROJECT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name|--name=*) flag_value name "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --zone|--zone=*) flag_value zone "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --project|--project=*) flag_value project "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
args=(gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet)
[[ -z "$PROJECT" ]] || args+=(--project="$PROJECT")
run "${args[@]}"
