"""Expert parallelism on 8 simulated CPU devices: the partitioner's token dispatch vs the explicit
all-to-all in shard_map (`moe_dispatch`), side by side, on expert 8 and expert 4 × fsdp 2.

    python benchmarks/moe_dispatch.py [--steps=5] [--rounds=3] [--capacity_factor=1.25]

Model: configs/moe_pretrain.py:tiny with 8 experts (2 layers, width 128, vocab 4096, experts of
width 128, top-2), batch 16 × 128 tokens, float32, AdamW; the project's jitted train step. A last
row runs the all-to-all with capacity-factor dropping (a smaller, static exchange buffer). The
variants alternate in rounds so all see the same machine load; medians of per-step times. The 8
devices share this machine's cores, so the figures compare the dispatches' work and memory
traffic, not real interconnects. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # Its own folder first.

import tqdm  # noqa: E402
from moe_throughput import BATCH, LENGTH, make_runner, recipe  # noqa: E402
from timing import median_time  # noqa: E402

from transformer import sharding  # noqa: E402

MESHES = {"expert8": dict(data=1, fsdp=1, expert=8, tensor=1),
          "expert4_fsdp2": dict(data=1, fsdp=2, expert=4, tensor=1)}


def variants(capacity_factor: float) -> dict[str, tuple[object, dict]]:
    """{name: (config, mesh shape)}."""
    out = {}
    for mesh_name, shape in MESHES.items():
        for dispatch in ("partitioner", "all_to_all"):
            out[f"{mesh_name}/{dispatch}"] = (recipe(num_experts=8, moe_dispatch=dispatch), shape)
    if capacity_factor:
        out[f"expert8/all_to_all_cf{capacity_factor:g}"] = (recipe(
            num_experts=8, moe_dispatch="all_to_all", moe_capacity_factor=capacity_factor),
            MESHES["expert8"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capacity_factor", type=float, default=1.25,
                        help="the dropping row's moe_capacity_factor (0: no such row)")
    args = parser.parse_args()
    configs = variants(args.capacity_factor)
    runners = {name: make_runner(config, sharding.make_mesh(shape))
               for name, (config, shape) in tqdm.tqdm(configs.items(), desc="compile")}
    times = {name: [] for name in configs}
    for _ in tqdm.trange(args.rounds, desc="rounds"):
        for name, run in runners.items():
            times[name].append(median_time(run, args.steps))
    result = {}
    for name in configs:
        seconds = statistics.median(times[name])
        result[name] = {"step_ms": round(1000 * seconds, 2),
                        "tokens_per_s": round(BATCH * LENGTH / seconds)}
    print(f"{'mesh/dispatch':32s} {'step ms':>9s} {'tokens/s':>9s} {'vs partitioner':>15s}")
    for name, row in result.items():
        base = result[name.split("/")[0] + "/partitioner"]["tokens_per_s"]
        print(f"{name:32s} {row['step_ms']:9.2f} {row['tokens_per_s']:9d} "
              f"{row['tokens_per_s'] / base:15.2f}")
    print(json.dumps({"batch": BATCH, "length": LENGTH, "devices": "8 simulated CPU", **result}))


if __name__ == "__main__":
    main()
