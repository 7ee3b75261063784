# shellcheck shell=bash
# The training XLA flags of launch/gpu/xla_flags.txt, for the GPU launch scripts (sourced, not
# run). docs/gpu.md says what they do and how to measure them.

# gpu_xla_flags: the file's flags on one line, then those already in $XLA_FLAGS (the later of
# two values of one flag wins, so the caller's own XLA_FLAGS override the file's).
gpu_xla_flags() {
  local file line items=()
  file="$(dirname "${BASH_SOURCE[0]}")/xla_flags.txt"
  [[ -r "$file" ]] || die "cannot read $file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    if [[ -n "$line" ]]; then items+=("$line"); fi
  done < "$file"
  if [[ -n "${XLA_FLAGS:-}" ]]; then items+=("$XLA_FLAGS"); fi
  echo "${items[*]}"
}
