"""Llama-7B training on v5p with the reference attention ('xla') against the splash kernel, per
chip, compiled ahead of time (transformer.aot; no TPU needed, libtpu only). The sequence is
whole on each chip (no context axis): fsdp over the 32 chips of a v5p-64.

    python benchmarks/aot_fused_attention.py                       # 8k and 32k, 1 row per chip
    python benchmarks/aot_fused_attention.py --lengths=8192 --rows_per_chip=4
    python benchmarks/aot_fused_attention.py --check_only          # the kernels are in the step

First it lowers a tiny Llama train step for v5p-8 and checks that the program calls the splash
kernels (forward, dq, dk/dv; a Pallas TPU custom call each). Then one compile per row (minutes
each for 7B on 2 CPU cores); prints a Markdown table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import aot  # noqa: E402
from transformer.aot_memory import GIB, parse_topology  # noqa: E402
from transformer.main import load_recipe  # noqa: E402

RECIPE = "configs/long_context.py:32k"  # Llama-7B, RoPE base 500k, bfloat16, remat full.
SPLASH_KERNELS = re.compile(r"splash_mha_(fwd|dq|dkv)_\w+")


def splash_kernels_in_train_step() -> list[str]:
    """The splash kernels a tiny Llama train step lowered for v5p-8 calls."""
    config = load_recipe("configs/llama_pretrain.py:tiny")
    aot.apply_overrides(config, ["--config.model.attention_impl=splash",
                                 "--config.model.dtype=bfloat16"])
    lowered, *_ = aot.lower_train_step(config, aot.topology_devices(parse_topology("v5p-8")))
    return sorted({m.group(0) for m in SPLASH_KERNELS.finditer(lowered.as_text())})


def overrides(impl: str, length: int, rows_per_chip: int, chips: int) -> list[str]:
    batch = 128 if length <= 32768 else 32  # The recipe's 4M tokens a step at 32k.
    accumulation = max(1, batch // (rows_per_chip * chips))
    return [f"--config.model.attention_impl={impl}", "--config.mesh.context=1",
            f"--config.mesh.fsdp={chips}", f"--config.data.global_batch_size={batch}",
            f"--config.grad_accum_steps={accumulation}", f"--config.data.max_length={length}",
            f"--config.model.max_length={length}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5p-64")
    parser.add_argument("--lengths", default="8192,32768", help="tokens per sequence")
    parser.add_argument("--rows_per_chip", type=int, default=1, help="per microbatch")
    parser.add_argument("--impls", default="xla,splash")
    parser.add_argument("--check_only", action="store_true")
    args = parser.parse_args()
    kernels = splash_kernels_in_train_step()
    print(f"splash kernels in the lowered train step: {kernels}")
    if len({k.split('_')[2] for k in kernels}) != 3:
        print("error: the step does not call the forward, dq and dk/dv kernels", file=sys.stderr)
        return 1
    if args.check_only:
        return 0
    topology = parse_topology(args.topology)
    chips = len(aot.topology_devices(topology))
    rows = [(length, impl) for length in map(int, args.lengths.split(","))
            for impl in args.impls.split(",")]
    results = []
    print("| attention | length | batch | microbatches × rows per chip | activations, temporaries"
          " | peak | HBM | fits | compile s |\n|---|---:|---:|---|---:|---:|---:|---|---:|")
    for length, impl in tqdm(rows, desc="compiles", unit="compile"):
        config = load_recipe(RECIPE)
        extra = overrides(impl, length, args.rows_per_chip, chips)
        aot.apply_overrides(config, extra)
        result = aot.run(config, topology)
        result.update(attention=impl, overrides=extra)
        results.append(result)
        peak = f"{result['total_bytes'] / GIB:.2f}" if "total_bytes" in result else "—"
        asked = aot.oom_temporaries(result.get("error", "")) or 0
        temporaries = (f"{result['temp_bytes'] / GIB:.2f}" if "temp_bytes" in result else
                       f"{asked / GIB:.2f} asked")
        tqdm.write(f"| {impl} | {length} | {result['global_batch_size']} | "
                   f"{result['grad_accum_steps']} × {result['rows_per_device']} | {temporaries} | "
                   f"{peak} | {topology.hbm_bytes / GIB:.0f} | {'yes' if result['fits'] else 'no'}"
                   f" | {result['compile_s']} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
