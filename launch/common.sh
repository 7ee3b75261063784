# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): errors, flag parsing, dry runs and
# the Cloud TPU accelerator table.

die() { echo "error: $*" >&2; exit 2; }

# DRY_RUN=1 prints each command (shell-quoted, one per line) instead of running it.
DRY_RUN=${DRY_RUN:-0}
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}

# flag_value NAME "$@": the value of --NAME=V or --NAME V into VALUE; SHIFT = the words used.
# shellcheck disable=SC2034  # SHIFT and VALUE are read by the caller.
flag_value() {
  local name=$1 word=$2
  if [[ "$word" == "--$name="* ]]; then
    SHIFT=1; VALUE=${word#--"$name"=}
  elif [[ $# -ge 3 ]]; then
    SHIFT=2; VALUE=$3
  else
    die "--$name needs a value"
  fi
  [[ -n "$VALUE" ]] || die "--$name needs a value"
}

# Chips per Cloud TPU accelerator type, or exit naming the known ones. v4/v5p names count
# TensorCores (2 per chip); v5e (v5litepod) and v6e names count chips.
tpu_chips() {
  local type=$1 gen count
  gen=${type%-*}; count=${type##*-}
  [[ "$type" == *-* && "$count" =~ ^[0-9]+$ ]] || die "unknown accelerator type '$type'; use e.g. v5litepod-16, v5p-128, v6e-8, v4-32"
  case "$gen" in
    v4|v5p)
      (( count >= 8 && (count & (count - 1)) == 0 )) || die "unknown accelerator type '$type': $gen-N takes N = 8, 16, 32, ... (TensorCores, a power of two)"
      echo $(( count / 2 )) ;;
    v5litepod|v5e|v6e)
      case "$count" in 1|4|8|16|32|64|128|256) echo "$count" ;;
        *) die "unknown accelerator type '$type': $gen-N takes N in 1 4 8 16 32 64 128 256" ;; esac ;;
    *) die "unknown accelerator type '$type'; generations: v4, v5p, v5litepod (v5e), v6e" ;;
  esac
}

# TPU VM hosts (workers) of an accelerator type: 4 chips per host, one host up to 8 chips on
# v5e/v6e and up to 4 chips on v4/v5p.
tpu_hosts() {
  local chips
  chips=$(tpu_chips "$1") || exit 2
  case "${1%-*}" in
    v4|v5p) echo $(( chips <= 4 ? 1 : chips / 4 )) ;;
    *) echo $(( chips <= 8 ? 1 : chips / 4 )) ;;
  esac
}

# check_workers TYPE N: exit unless N matches the hosts of TYPE.
check_workers() {
  local hosts
  hosts=$(tpu_hosts "$1") || exit 2
  [[ "$2" =~ ^[0-9]+$ ]] || die "--workers must be a number, got '$2'"
  (( $2 == hosts )) || die "--workers=$2 does not match $1, which has $hosts worker host(s)"
}

# The default TPU VM image of an accelerator type's generation.
tpu_runtime() {
  case "${1%-*}" in
    v5litepod|v5e) echo "v2-alpha-tpuv5-lite" ;;
    v5p) echo "v2-alpha-tpuv5" ;;
    v6e) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# The TPU VM node names of queued resource NAME: NAME, or NAME-0 ... NAME-(N-1) for N slices.
tpu_nodes() {
  if (( $2 > 1 )); then
    local i
    for (( i = 0; i < $2; i++ )); do echo "$1-$i"; done
  else
    echo "$1"
  fi
}
