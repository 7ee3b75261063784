#!/usr/bin/env bash
# Put this repository and its pinned requirements (jax[tpu]) on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/setup.sh --name=NAME --zone=ZONE [options]

On every worker (--worker=all) of node NAME (or NAME-0 ... with --num-slices): installs
Python 3.11, creates ~/venv, puts the code in ~/transformer (a copy of this checkout's HEAD,
or a clone of --repo-url) and installs requirements.txt with jax[tpu]==0.10.2.

  --name=NAME         queued-resource / node name (required)
  --zone=ZONE         zone of the TPU VM (required)
  --project=PROJECT   Google Cloud project
  --num-slices=N      multislice: set up the nodes NAME-0 ... NAME-(N-1)
  --repo-url=URL      git clone URL on the workers instead of copying this checkout
  --ref=REF           branch, tag or commit to check out with --repo-url (default: main)
  --dry-run           print the commands instead of running them
  -h, --help          this help
USAGE
}

NAME="" ZONE="" PROJECT="" SLICES=1 REPO_URL="" REF="main"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name|--name=*) flag_value name "$@"; NAME=$VALUE; shift "$SHIFT" ;;
    --zone|--zone=*) flag_value zone "$@"; ZONE=$VALUE; shift "$SHIFT" ;;
    --project|--project=*) flag_value project "$@"; PROJECT=$VALUE; shift "$SHIFT" ;;
    --num-slices|--num-slices=*) flag_value num-slices "$@"; SLICES=$VALUE; shift "$SHIFT" ;;
    --repo-url|--repo-url=*) flag_value repo-url "$@"; REPO_URL=$VALUE; shift "$SHIFT" ;;
    --ref|--ref=*) flag_value ref "$@"; REF=$VALUE; shift "$SHIFT" ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive number, got '$SLICES'"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ARCHIVE="${TMPDIR:-/tmp}/transformer-src.tar.gz"
scope=(--zone="$ZONE" --worker=all)
[[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")

python_env='sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv git'
python_env+=' && python3.11 -m venv ~/venv && ~/venv/bin/pip install -q --upgrade pip'
# shellcheck disable=SC2088  # ~ expands on the workers.
install="~/venv/bin/pip install -q -r ~/transformer/requirements.txt 'jax[tpu]==0.10.2'"
if [[ -n "$REPO_URL" ]]; then
  printf -v code 'rm -rf ~/transformer && git clone -q %q ~/transformer && git -C ~/transformer checkout -q %q' \
    "$REPO_URL" "$REF"
else
  code='rm -rf ~/transformer && mkdir -p ~/transformer && tar -xzf ~/transformer-src.tar.gz -C ~/transformer'
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$ARCHIVE" HEAD
fi
for node in $(tpu_nodes "$NAME" "$SLICES"); do
  if [[ -z "$REPO_URL" ]]; then
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$node:transformer-src.tar.gz" "${scope[@]}"
  fi
  run gcloud compute tpus tpu-vm ssh "$node" "${scope[@]}" --command="$python_env && $code && $install"
done
