"""Llama-7B (Llama-2 shape, 6.7B parameters): the full train step compiled ahead of time for a
v5p-64 slice (32 chips, fsdp over all of them), with its per-device memory. No TPU needed.

    python benchmarks/aot_llama7b.py [--topology=v5p-64] [--per_device_batch=4] [--seq_len=4096]

Falls back to the next larger v5p slice when it does not fit; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import aot  # noqa: E402
from transformer.aot_memory import format_report, parse_topology  # noqa: E402

FALLBACK = ("v5p-64", "v5p-128", "v5p-256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5p-64")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=4096)
    args = parser.parse_args()
    candidates = [args.topology, *[t for t in FALLBACK if t != args.topology]]
    result = {}
    for name in candidates:
        config = aot.preset_config("llama-7b")  # bfloat16 compute, full remat, fsdp = all chips.
        config.data.max_length = args.seq_len
        result = aot.run(config, parse_topology(name), per_device_batch=args.per_device_batch)
        print(f"llama-7b ({result['params'] / 1e9:.2f}B parameters) on {name}, batch "
              f"{result['global_batch_size']} × {result['seq_len']}:")
        if "error" in result:
            print(f"  does not fit: {result['error']}")
            continue
        print(f"  mesh {result['mesh']}; compiled in {result['compile_s']} s")
        print(format_report(result))
        if result["fits"]:
            break
    print(json.dumps({"benchmark": "aot_llama7b", **result}))
    return 0 if result.get("fits") else 1


if __name__ == "__main__":
    sys.exit(main())
