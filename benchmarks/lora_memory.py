"""Per-device memory of one Llama-2-7B train step on TPU v5e slices: full fine-tuning against LoRA,
compiled ahead of time with transformer.aot (libtpu as the compiler; no TPU needed).

    python benchmarks/lora_memory.py            # llama-7b, 8 × 2048 tokens a step (minutes)
    python benchmarks/lora_memory.py --quick    # llama-tiny, 8 × 128: a smoke test (seconds)

Variants, each with AdamW (float32 moments), bfloat16 compute and full remat (as the llama 7b
recipe, configs/llama_pretrain.py:7b):
  full           every parameter trains; float32 parameters and moments
  lora-f32       LoRA r=16 (alpha 32) on all linear layers; the base stays float32, frozen
  lora-bf16      the same, with the frozen base stored in bfloat16 (finetune.frozen_dtype)
For each, slices are tried smallest first (v5e:1x1, 2x2, 2x4, 4x4, 4x8, 8x8), stopping at the
first that fits. The global batch is the same on every slice (8 sequences by default), sharded
over fsdp; on slices with more chips than sequences the remaining factor goes to the tensor axis,
so the state is still spread over every chip. A slice where the parameters and optimizer state
alone exceed HBM (a lower bound: every byte is on some chip) is skipped without compiling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

# Before jax is imported: its default backend stays the CPU; libtpu serves only as the compiler
# for the described topologies (transformer.aot sets the per-topology TPU variables).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from transformer import aot  # noqa: E402
from transformer.aot_memory import GIB, Topology, parse_topology  # noqa: E402

SLICES = ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8")
LORA_RANK = 16
LORA_ALPHA = 32.0  # Scale alpha/r = 2; it changes no shape, so no memory figure.
# name → (LoRA rank, finetune.frozen_dtype, description)
VARIANTS: dict[str, tuple[int, str, str]] = {
    "full": (0, "", "full fine-tuning, AdamW, float32 params + moments"),
    "lora-f32": (LORA_RANK, "", f"LoRA r={LORA_RANK} all-linear, float32 frozen base"),
    "lora-bf16": (LORA_RANK, "bfloat16", f"LoRA r={LORA_RANK} all-linear, bfloat16 frozen base"),
}


def make_config(preset: str, variant: str, seq_len: int, batch: int, chips: int) -> Any:
    """The trainer config of one variant on a slice of `chips` chips."""
    config = aot.preset_config(preset)  # bfloat16 compute, full remat, no dropout.
    rank, frozen_dtype, _ = VARIANTS[variant]
    config.data.max_length = seq_len
    config.data.global_batch_size = batch
    config.model.lora_rank = rank
    config.model.lora_alpha = LORA_ALPHA
    config.model.lora_targets = ("all-linear",) if rank else ()
    config.finetune.frozen_dtype = frozen_dtype
    config.finetune.train_also = ""  # The adapters only (the default `^head\.` names no LM part).
    # The batch splits over at most `batch` data-parallel chips; the rest shard the tensor axis.
    fsdp = math.gcd(chips, batch)
    config.mesh.update({"data": 1, "fsdp": fsdp, "tensor": chips // fsdp})
    return config


def shape_summary(config: Any) -> dict[str, int]:
    """Parameter counts and state bytes from shapes alone (nothing allocated, nothing compiled)."""
    import jax

    from transformer.models import ModelConfig
    from transformer.train import optimizer, trainable
    from transformer.train import state as train_state

    model_config = ModelConfig.from_dict(config.model.to_dict())
    tx, _ = optimizer.make_optimizer(config)
    shapes = jax.eval_shape(train_state.make_run_init_fn(config, model_config, tx))
    trains = trainable.predicate(config)
    n_trainable, n_total = trainable.count(shapes.params, trains)
    nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return {"trainable": n_trainable, "total": n_total, "params_bytes": nbytes(shapes.params),
            "trainable_bytes": nbytes(trainable.split(shapes.params, trains)[0]),
            "optimizer_bytes": nbytes(shapes.opt_state)}


def measure_variant(preset: str, variant: str, slices: list[Topology], seq_len: int, batch: int,
                    deadline: float) -> dict[str, Any]:
    """Shape counts, then one compile per slice until one fits (or the deadline passes)."""
    summary = shape_summary(make_config(preset, variant, seq_len, batch, 1))
    result: dict[str, Any] = {"variant": variant, **summary, "slices": [], "fits_on": None}
    for topology in slices:
        entry: dict[str, Any] = {"slice": topology.name, "chips": topology.chips}
        result["slices"].append(entry)
        state_floor = (summary["params_bytes"] + summary["optimizer_bytes"]) / topology.chips
        if state_floor > topology.hbm_bytes:
            entry.update(status="skipped", state_floor_bytes=state_floor)
            print(f"  {variant} on {topology.name}: skipped, parameters + optimizer state alone "
                  f"are ≥ {state_floor / GIB:.2f} GiB per chip", flush=True)
            continue
        if time.monotonic() > deadline:
            entry["status"] = "not measured (time budget spent)"
            print(f"  {variant} on {topology.name}: not measured, time budget spent", flush=True)
            break
        config = make_config(preset, variant, seq_len, batch, topology.chips)
        print(f"  {variant} on {topology.name}: compiling ...", flush=True)
        report = aot.run(config, topology)
        entry.update(status="compiled", **report)
        if "error" in report:
            need = report.get("required_bytes")
            print("    out of HBM at compile time" + (f" (needs ~{need / GIB:.2f} GiB)"
                  if need else "") + f"; {report['compile_s']} s", flush=True)
        else:
            print(f"    peak {report['total_bytes'] / GIB:.2f} GiB of "
                  f"{report['hbm_bytes'] / GIB:.0f} GiB: "
                  f"{'fits' if report['fits'] else 'does not fit'}; {report['compile_s']} s",
                  flush=True)
        if report["fits"]:
            result["fits_on"] = topology.name
            break
    return result


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _cell(entry: dict[str, Any]) -> str:
    if entry["status"] == "skipped":
        return f"skip (state ≥{entry['state_floor_bytes'] / GIB:.1f})"
    if entry["status"] != "compiled":
        return "not measured"
    if "error" in entry:
        need = entry.get("required_bytes")
        return f"OOM (~{need / GIB:.1f})" if need else "OOM"
    return f"{entry['total_bytes'] / GIB:.2f} {'fits' if entry['fits'] else 'over'}"


def format_tables(results: list[dict[str, Any]], slices: list[Topology]) -> str:
    names = [t.name for t in slices]
    head = (f"{'variant':<10} {'trainable':>10} {'total':>8} {'opt state':>10} "
            + " ".join(f"{n:>17}" for n in names) + f" {'smallest fit':>13} {'compile s':>10}")
    lines = ["Per-device peak memory, GiB (v5e: 16 GiB HBM per chip); state = parameters + "
             "optimizer state per chip", head, "-" * len(head)]
    for r in results:
        by_slice = {e["slice"]: e for e in r["slices"]}
        cells = [_cell(by_slice[n]) if n in by_slice else "-" for n in names]
        seconds = [str(e["compile_s"]) for e in r["slices"] if "compile_s" in e]
        lines.append(f"{r['variant']:<10} {_count(r['trainable']):>10} {_count(r['total']):>8} "
                     f"{_size(r['optimizer_bytes']):>10} "
                     + " ".join(f"{c:>17}" for c in cells)
                     + f" {r['fits_on'] or 'none tried':>13} {'+'.join(seconds) or '-':>10}")
    lines.append("~ = the compiler refused the program (CompileTimeHbmOom): its stated "
                 "temporaries + the state, an estimate (transformer.aot), not a compiled peak")
    lines += ["", "Each compile, per device (GiB): arguments = state + batch as the compiler "
              "lays them out; outputs = outputs not donated; temp = activations, temporaries, "
              "code; peak = compiler high-water mark"]
    head = (f"{'variant':<10} {'slice':<8} {'mesh (fsdp×tensor)':>18} {'rows/chip':>9} "
            f"{'params':>7} {'opt':>7} {'arguments':>9} {'outputs':>7} {'temp':>7} {'peak':>7} "
            f"{'HBM %':>6} {'fits':>5} {'compile s':>9}")
    lines += [head, "-" * len(head)]
    for r in results:
        for e in r["slices"]:
            if e["status"] != "compiled":
                continue
            mesh = f"{e['mesh']['fsdp']}×{e['mesh']['tensor']}"
            g = lambda key, e=e: f"{e[key] / GIB:.2f}" if key in e else "-"
            peak = e.get("total_bytes") or e.get("required_bytes")
            share = ((f"{peak / e['hbm_bytes']:.0%}" if "total_bytes" in e
                      else f"~{peak / e['hbm_bytes']:.0%}") if peak else "-")
            lines.append(
                f"{r['variant']:<10} {e['slice']:<8} {mesh:>18} {e['rows_per_device']:>9} "
                f"{g('params_bytes'):>7} {g('optimizer_bytes'):>7} {g('argument_bytes'):>9} "
                f"{g('output_extra_bytes'):>7} {g('temp_bytes'):>7} "
                f"{(g('total_bytes') if 'total_bytes' in e else 'OOM'):>7} {share:>6} "
                f"{'yes' if e['fits'] else 'no':>5} {e['compile_s']:>9}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="llama-tiny at 128 tokens: a fast smoke test of the whole path")
    parser.add_argument("--seq_len", type=int, default=0, help="default 2048 (quick: 128)")
    parser.add_argument("--batch", type=int, default=8, help="global batch, in sequences")
    parser.add_argument("--slices", default=",".join(SLICES),
                        help="comma-separated v5e chip grids, tried in this order")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"among {list(VARIANTS)}")
    parser.add_argument("--time_budget", type=float, default=1320.0,
                        help="seconds; no new compile starts after this")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args()
    preset = "llama-tiny" if args.quick else "llama-7b"
    seq_len = args.seq_len or (128 if args.quick else 2048)
    slices = [parse_topology(s) for s in args.slices.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    start = time.monotonic()
    deadline = start + args.time_budget
    print(f"{preset}: one train step, global batch {args.batch} × {seq_len} tokens, bfloat16 "
          f"compute, remat full, AdamW; compiled for virtual TPU v5e slices", flush=True)
    results = []
    for variant in variants:
        print(f"{variant}: {VARIANTS[variant][2]}", flush=True)
        results.append(measure_variant(preset, variant, slices, seq_len, args.batch, deadline))
    print()
    print("Trainable parameters from shapes (transformer.train.trainable.count):")
    for r in results:
        print(f"  {r['variant']:<10} {r['trainable']:>14,} of {r['total']:>14,} "
              f"({r['trainable'] / r['total']:.3%}); optimizer state {r['optimizer_bytes']:,} "
              f"bytes ({_size(r['optimizer_bytes'])}); parameters {_size(r['params_bytes'])}")
    print()
    print(format_tables(results, slices))
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    if args.json:
        print(json.dumps({"benchmark": "lora_memory", "preset": preset, "seq_len": seq_len,
                          "global_batch_size": args.batch, "results": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
