"""TPU topologies by name, their HBM, and per-device memory accounting of a compiled train step.

Pure Python (no libtpu needed), so the parsing and the arithmetic are testable anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

GIB = 1024**3

# Per-chip HBM (Cloud TPU system-architecture pages). v4 and v5p chips have two TensorCores that
# jax drives as one "megacore" device, so one device = one chip on every generation listed here.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
# 3D-torus generations name slices by TensorCores (v5p-256 = 128 chips); 2D ones by chips.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
SLICE_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slice sizes on offer.


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # 'v4', 'v5e', 'v5p' or 'v6e'.
    shape: tuple[int, ...]  # Chips along each torus/mesh axis.

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The topology name libtpu understands, e.g. 'v5p:4x4x8'."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU accelerator type of this slice, e.g. 'v5p-256' or 'v5litepod-16'."""
        prefix = "v5litepod" if self.generation == "v5e" else self.generation
        return f"{prefix}-{self.chips * CORES_PER_CHIP[self.generation]}"

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        # Four chips per host (2x2) on multi-host slices; smaller slices are one host.
        dims = (*self.shape, 1)[:3]
        return tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))


def _balanced_shape(chips: int, start: list[int]) -> tuple[int, ...]:
    """Cloud TPU's slice shapes: double the last of the smallest axes until the chips fit
    (v5p-64 → 2x4x4, v5p-256 → 4x4x8, v5e-32 → 4x8)."""
    dims = list(start)
    while math.prod(dims) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return tuple(dims)


def parse_topology(spec: str) -> Topology:
    """'v5p-256', 'v5litepod-16', 'v6e-8', 'v4-32' (Cloud TPU accelerator types) or an explicit
    'v5e:2x2' / 'v5p:4x4x8' chip grid."""
    text = spec.strip().lower()
    match = re.fullmatch(r"([a-z0-9]+)(?::([0-9x]+)|-([0-9]+))", text)
    generation = match and ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in HBM_GIB:
        raise ValueError(
            f"unknown TPU topology {spec!r}; use an accelerator type like v5p-256, v5litepod-16 "
            f"(= v5e-16), v6e-8, v4-32, or a chip grid like v5e:2x2, v5p:4x4x8 "
            f"(generations: {sorted(HBM_GIB)})"
        )
    three_d = CORES_PER_CHIP[generation] == 2
    if match.group(2):  # An explicit chip grid.
        shape = tuple(int(d) for d in match.group(2).split("x") if d)
        if len(shape) != (3 if three_d else 2) or min(shape) < 1:
            raise ValueError(
                f"topology {spec!r}: {generation} needs {'3' if three_d else '2'} positive chip "
                f"counts, e.g. {'v5p:2x2x1' if three_d else 'v5e:2x2'}"
            )
        return Topology(generation, shape)
    count = int(match.group(3))
    if three_d:
        chips, odd = divmod(count, 2)
        if odd or chips < 4 or chips & (chips - 1):
            raise ValueError(
                f"topology {spec!r}: {generation}-N counts TensorCores (2 per chip); N must be a "
                f"power of two ≥ 8 here (e.g. {generation}-8, {generation}-256); for other shapes "
                f"give the chip grid, e.g. {generation}:4x4x6"
            )
        return Topology(generation, _balanced_shape(chips, [2, 2, 1]))
    if count not in SLICE_CHIPS_2D:
        raise ValueError(
            f"topology {spec!r}: {generation} slices have {list(SLICE_CHIPS_2D)} chips; or give "
            f"the chip grid, e.g. {generation}:2x2"
        )
    return Topology(generation, _balanced_shape(count, [1, 1]))


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def memory_report(compiled_memory: Any, abstract_state: Any, abstract_batch: Any,
                  hbm_bytes: int) -> dict[str, Any]:
    """Per-device bytes: the state's parts counted from their shardings (no layout padding), and
    what the compiler reserves. `peak_memory_in_bytes` is the compiler's high-water mark; the TPU
    compiler reports `temp_size_in_bytes` as 0 and counts activations only in the peak."""
    ma = compiled_memory
    arguments = int(ma.argument_size_in_bytes)
    outputs_not_aliased = max(int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes), 0)
    code = int(ma.generated_code_size_in_bytes)
    summed = arguments + outputs_not_aliased + int(ma.temp_size_in_bytes) + code
    peak = max(int(getattr(ma, "peak_memory_in_bytes", 0) or 0), summed)
    return {
        "params_bytes": per_device_bytes(abstract_state.params),
        "optimizer_bytes": per_device_bytes(abstract_state.opt_state),
        "batch_bytes": per_device_bytes(abstract_batch),
        "argument_bytes": arguments,
        "output_extra_bytes": outputs_not_aliased,
        "temp_bytes": peak - arguments - outputs_not_aliased,
        "code_bytes": code,
        "total_bytes": peak,
        "hbm_bytes": hbm_bytes,
        "fits": peak <= hbm_bytes,
    }


def format_report(report: dict[str, Any]) -> str:
    """A per-device memory table, in GiB, against the chip's HBM."""
    g = lambda key: report[key] / GIB
    rows = [
        ("parameters", g("params_bytes")),
        ("optimizer state", g("optimizer_bytes")),
        ("batch", g("batch_bytes")),
        ("compiler: arguments (state + batch)", g("argument_bytes")),
        ("compiler: outputs not donated", g("output_extra_bytes")),
        ("compiler: activations, temporaries, code", g("temp_bytes")),
        ("generated code (program)", g("code_bytes")),
        ("total per device (compiler peak)", g("total_bytes")),
    ]
    lines = [f"  {name:<42}{value:>10.3f} GiB" for name, value in rows]
    share = report["total_bytes"] / report["hbm_bytes"]
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"  {'HBM per chip':<42}{g('hbm_bytes'):>10.3f} GiB  ({share:.0%} used: {verdict})")
    return "\n".join(lines)
