"""The whole path on the accelerator this host has (GPU, TPU, or the CPU in tiny sizes), one run:

    python benchmarks/accelerator.py                  # every section, real model sizes on GPU/TPU
    python benchmarks/accelerator.py --cpu            # tiny sizes on the CPU in about a minute (CI)
    python benchmarks/accelerator.py --sections=train --grid=gpt2:32:dots --grid=llama-1b:16:full
    python benchmarks/accelerator.py --sections=none --ab_xla_flags=none,launch   # XLA flags A/B

1. equivalence: attention against the einsum reference (the project's `impl='einsum'`, float32,
   highest matmul precision), in float32 and bfloat16, with causal, padded and packed masks,
   outputs and gradients, for `impl='xla'` and, on GPUs, cuDNN flash attention
   (`jax.nn.dot_product_attention(implementation='cudnn')`); the speed of each at the training
   shapes; and the models' logits with `attention_impl='xla'` against `'einsum'`.
2. train: tokens/s and MFU of the project's jitted train step (`transformer.train.step`, the one
   `transformer.main` runs) on GPT-2 124M (sequence 1024) and Llama-1B (sequence 2048) with the
   recipes' settings (configs/gpt2_pretrain.py:small, configs/llama_pretrain.py:1b: bfloat16
   compute, float32 parameters, AdamW, clipping) for each batch size and remat policy of `--grid`.
   MFU = tokens/s × `flops.flops_per_token` / (`flops.peak_flops` × devices); XLA's own FLOP
   count of the compiled step (rematerialization included) gives the hardware utilization.
3. decode: tokens/s and time to first token of `transformer.inference.generate` (greedy, KV
   cache) on the same models at batch 1 and 64.
4. profile: one `jax.profiler` trace of each model's train step (open it in TensorBoard or
   Perfetto), and the ops that took the most device time in it.

`--xla_flags` sets XLA_FLAGS for this run ('env' leaves it as it is; 'none'; 'launch' = the flags
of launch/gpu/xla_flags.txt, which the GPU launch scripts set; 'launch+cublas',
'launch+no_command_buffer'; or literal flags). `--ab_xla_flags=a,b,...` runs the train section once
per variant, each in a fresh process, side by side. A configuration that does not fit in memory
is reported with its error, not fatal. `--out` gets result.json and the traces; the last line
printed is the JSON.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS_FILE = REPO / "launch" / "gpu" / "xla_flags.txt"
MODELS = ("gpt2", "llama-1b")
RECIPES = {"gpt2": ("configs.gpt2_pretrain", "small"), "llama-1b": ("configs.llama_pretrain", "1b")}
SEQ = {"gpt2": 1024, "llama-1b": 2048}
DEFAULT_GRID = ("gpt2:16,32:dots,none", "llama-1b:8,16:full,dots")
# Tiny mode: the recipes' settings on models a CPU trains in a second.
TINY_MODEL = {"gpt2": dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256, vocab_size=512,
                           max_length=128),
              "llama-1b": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               mlp_dim=192, vocab_size=512)}
TINY_SEQ, TINY_GRID = 64, ("gpt2:2:dots", "llama-1b:2:full")
CPU_ONLY_MODULES = ("torch", "tensorflow", "transformers", "sklearn")


def launch_flags() -> list[str]:
    """The flags of launch/gpu/xla_flags.txt (one a line, '#' comments)."""
    lines = (line.split("#", 1)[0].strip() for line in FLAGS_FILE.read_text().splitlines())
    return [line for line in lines if line]


def flag_variants() -> dict[str, list[str]]:
    launch = launch_flags()
    return {"none": [], "launch": launch,
            # GEMMs by cuBLAS alone, no Triton GEMM fusions (what MaxText's GPU runs set).
            "launch+cublas": launch + ["--xla_gpu_enable_triton_gemm=false"],
            # No CUDA graphs: every kernel launched from the host.
            "launch+no_command_buffer": launch + ["--xla_gpu_enable_command_buffer="]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="JAX_PLATFORMS=cpu, tiny sizes")
    p.add_argument("--size", choices=["auto", "tiny", "full"], default="auto",
                   help="auto: tiny on the CPU, the real models elsewhere")
    p.add_argument("--sections", default="equivalence,train,decode,profile",
                   help="comma-separated, or 'none'")
    p.add_argument("--grid", action="append",
                   help="MODEL:BATCHES:REMATS, e.g. gpt2:16,32:dots,none (repeatable; default "
                        f"{' '.join(DEFAULT_GRID)}; tiny: {' '.join(TINY_GRID)})")
    p.add_argument("--steps", type=int, help="timed steps per round (default 10; tiny 3)")
    p.add_argument("--rounds", type=int, help="timed rounds; the median is reported (default 3; "
                                              "tiny 1)")
    p.add_argument("--devices", type=int, default=1, help="devices to train on (0 = all)")
    p.add_argument("--peak_flops", type=float, help="per-device peak FLOP/s (default: "
                                                    "flops.peak_flops)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. model.dropout_rate=0.0 (repeatable)")
    p.add_argument("--decode_batches", default="1,64")
    p.add_argument("--prompt_len", type=int, help="default 128; tiny 8")
    p.add_argument("--new_tokens", type=int, help="default 128; tiny 8")
    p.add_argument("--xla_flags", default="env",
                   help="env, none, launch, launch+cublas, launch+no_command_buffer, or flags")
    p.add_argument("--ab_xla_flags", default="",
                   help="comma-separated --xla_flags variants to compare on the train section")
    p.add_argument("--ab_repeats", type=int, default=1, help="runs of each variant, interleaved")
    p.add_argument("--out", help="folder for result.json and traces (default: a temp folder)")
    return p


def configure_environment(args: argparse.Namespace) -> None:
    """What acts through the environment, before jax is imported."""
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.xla_flags != "env":
        variants = flag_variants()
        if args.xla_flags.startswith("--"):
            os.environ["XLA_FLAGS"] = args.xla_flags
        elif args.xla_flags in variants:
            os.environ["XLA_FLAGS"] = " ".join(variants[args.xla_flags])
        else:
            sys.exit(f"--xla_flags={args.xla_flags!r}: use env, {', '.join(variants)} or flags")


if __name__ == "__main__":
    ARGS = parser().parse_args()
    configure_environment(ARGS)
sys.path.insert(0, str(REPO))  # Run from anywhere.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks.timing import median_time  # noqa: E402
from transformer import sharding  # noqa: E402
from transformer.inference import SamplingConfig, generate  # noqa: E402
from transformer.models import (  # noqa: E402
    ModelConfig,
    build_model,
    dot_product_attention,
    make_attention_mask,
)
from transformer.train import flops, optimizer  # noqa: E402
from transformer.train import state as train_state  # noqa: E402
from transformer.train import step as step_lib  # noqa: E402
from transformer.train.objectives import get_objective  # noqa: E402

# --- Configurations ---------------------------------------------------------------------------

def recipe(name: str, tiny: bool, overrides: list[str], batch: int = 1, remat: str | None = None):
    """The trainer config of the model's pretraining recipe, sized for this run."""
    module, variant = RECIPES[name]
    c = importlib.import_module(module).get_config(variant)
    if tiny:
        c.model.update(TINY_MODEL[name])
    c.data.global_batch_size, c.data.max_length = batch, TINY_SEQ if tiny else SEQ[name]
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    if remat is not None:
        c.model.remat_policy = remat
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        old = node[leaf]
        node[leaf] = type(old)(json.loads(value)) if isinstance(old, (bool, int, float)) else value
    return c


def model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def parse_grid(specs: list[str]) -> list[tuple[str, int, str]]:
    grid = []
    for spec in specs:
        name, batches, remats = spec.split(":")
        if name not in RECIPES:
            sys.exit(f"--grid={spec}: unknown model {name!r}; choose from {list(RECIPES)}")
        grid += [(name, int(b), r) for b in batches.split(",") for r in remats.split(",")]
    return grid


def rel_error(a, b, rows=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def segments(batch: int, length: int) -> dict[str, np.ndarray]:
    """Segment ids [batch, length] of the three mask cases; row 1 of padded/packed ends in padding."""
    full = np.ones((batch, length), np.int32)
    padded, packed = full.copy(), full.copy()
    padded[1::2, length * 5 // 8:] = 0
    q = length // 4
    packed[:, q:2 * q], packed[:, 2 * q:] = 2, 3
    packed[1::2, 3 * q:] = 0
    return {"causal": full, "padded": padded, "packed": packed}


def positions_of(seg: np.ndarray) -> np.ndarray:
    """Positions counting from each segment's first token."""
    index = np.arange(seg.shape[1])[None].repeat(seg.shape[0], 0)
    starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)).astype(np.int32)


# --- 1. Equivalence ---------------------------------------------------------------------------

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # Relative to the largest reference value.


def attention(impl: str, case: str, seg: np.ndarray, scale: float):
    """(q, k, v) → output [B,T,H,D] of one implementation, with the case's mask."""
    mask = make_attention_mask(seg, seg, causal=True)
    if impl != "cudnn":
        return lambda q, k, v: dot_product_attention(q, k, v, mask, impl=impl)[0]
    lengths = jnp.asarray((seg != 0).sum(1), jnp.int32)
    kwargs = {"causal": dict(is_causal=True),
              "padded": dict(is_causal=True, query_seq_lengths=lengths,
                             key_value_seq_lengths=lengths),
              "packed": dict(mask=mask)}[case]  # Packing: a general mask (cuDNN adds it as bias).
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation="cudnn", **kwargs)


def with_grads(fn):
    """jit of (q, k, v, cotangent) → (output, (dq, dk, dv)) of Σ output·cotangent."""
    def loss(q, k, v, cot):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v, cot: (lambda r: (r[0][1], r[1]))(grad(q, k, v, cot)))


def attention_equivalence(shape: tuple[int, ...], impls: list[str]) -> list[dict]:
    """Each implementation in each dtype against the einsum reference in float32 (the inputs are
    bfloat16 values, so both dtypes see the same numbers); einsum itself in bfloat16 shows the
    error that the dtype alone makes."""
    b, t, h, kv, d = shape
    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16).astype(jnp.float32)
           for n in (h, kv, kv)]
    results = []
    for case, seg in segments(b, t).items():
        real = seg != 0  # Padding queries are unspecified; they get no gradient either.
        cot = jnp.asarray(rng.normal(size=(b, t, h, d)) * real[:, :, None, None], jnp.float32)
        with jax.default_matmul_precision("highest"):
            ref_out, ref_grads = with_grads(attention("einsum", case, seg, d**-0.5))(*qkv, cot)
        for dtype in ("float32", "bfloat16"):
            q, k, v = (x.astype(dtype) for x in qkv)
            for impl in (impls if dtype == "float32" else ["einsum", *impls]):
                row = {"impl": impl, "dtype": dtype, "mask": case}
                try:
                    fn = with_grads(attention(impl, case, seg, d**-0.5))
                    precision = "highest" if dtype == "float32" else "default"
                    with jax.default_matmul_precision(precision):
                        out, grads = fn(q, k, v, cot)
                except Exception as e:  # cuDNN rejects some dtypes/shapes: report, not fail.
                    results.append({**row, "status": "unsupported", "error": str(e)[:300]})
                    continue
                errors = {"out": rel_error(out, ref_out, real)}
                errors.update({f"d{n}": rel_error(g, r, real) for n, g, r in
                               zip("qkv", grads, ref_grads)})
                ok = max(errors.values()) <= TOLERANCE[dtype]
                results.append({**row, "status": "pass" if ok else "fail", "errors": errors})
    return results


def attention_speed(shapes: dict[str, tuple[int, ...]], impls: list[str], repeats: int) -> dict:
    """Forward + backward milliseconds of causal bfloat16 attention at each model's shape."""
    speed = {}
    for name, (b, t, h, kv, d) in shapes.items():
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16) for n in (h, kv, kv))
        cot = jnp.ones((b, t, h, d), jnp.float32)
        seg = np.ones((b, t), np.int32)
        speed[name] = {"shape": [b, t, h, kv, d]}
        for impl in ["einsum", *impls]:
            try:
                fn = with_grads(attention(impl, "causal", seg, d**-0.5))
                inputs = (q, k, v, cot)
                jax.block_until_ready(fn(*inputs))
                ms = 1e3 * median_time(
                    lambda fn=fn, inputs=inputs: jax.block_until_ready(fn(*inputs)), repeats)
                speed[name][impl] = {"fwd_bwd_ms": ms}
            except Exception as e:
                speed[name][impl] = {"error": str(e)[:300]}
    return speed


def _logits(cfg: ModelConfig, batch, impl: str, dtype: str, precision: str) -> np.ndarray:
    ids, seg, pos = batch
    graphdef, params = nnx.split(build_model(cfg.replace(attention_impl=impl, dtype=dtype), seed=0))
    run = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, segment_ids=seg, positions=pos).logits)
    with jax.default_matmul_precision(precision):
        return np.asarray(run(params), np.float32)


def model_equivalence(names: tuple[str, ...], tiny: bool, overrides: list[str]) -> list[dict]:
    """Logits of each model with attention_impl='xla' and 'einsum', float32 and bfloat16, on a
    packed batch with padding, against einsum in float32 at the highest matmul precision."""
    results = []
    for name in names:
        cfg = model_config(recipe(name, tiny, overrides)).replace(
            dropout_rate=0.0, attention_dropout_rate=0.0, **({} if tiny else {"num_layers": 2}))
        length = TINY_SEQ if tiny else 512
        seg = segments(2, length)["packed"]
        ids = np.random.default_rng(1).integers(1, cfg.vocab_size, size=seg.shape).astype(np.int32)
        batch = (ids, seg, positions_of(seg))
        reference = _logits(cfg, batch, "einsum", "float32", "highest")
        for dtype in ("float32", "bfloat16"):
            precision = "highest" if dtype == "float32" else "default"
            errors = {impl: 0.0 if (impl, dtype) == ("einsum", "float32") else rel_error(
                _logits(cfg, batch, impl, dtype, precision), reference, seg != 0)
                for impl in ("einsum", "xla")}
            # bfloat16: xla may differ from the reference by as much as einsum in bfloat16 does.
            tol = max(TOLERANCE[dtype], 2 * errors["einsum"])
            results.append({"model": name, "dtype": dtype, "errors": errors,
                            "status": "pass" if errors["xla"] <= tol else "fail"})
        gc.collect()
    return results


# --- 2. Training (and 4. its profile) ---------------------------------------------------------

def cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value else None


def compiled_memory(compiled) -> dict | None:
    """Bytes of the compiled step on one device: its arguments (the state and the batch),
    outputs, and temporaries (activations, gradients), less what donation aliases."""
    try:
        m = compiled.memory_analysis()
        parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                 "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    except Exception:
        return None
    parts["total"] = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    return parts


def peak_memory(device) -> int | None:
    """The most bytes this process has held on the device so far (GPU/TPU; None on the CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    return stats.get("peak_bytes_in_use")


def train_one(name: str, batch: int, remat: str, args, devices, peak: float,
              trace_dir: pathlib.Path | None = None) -> dict:
    config = recipe(name, args.tiny, args.set, batch, remat)
    cfg = model_config(config)
    seq = config.data.max_length
    row = {"model": name, "batch": batch, "seq": seq, "remat": remat, "dtype": cfg.dtype,
           "param_dtype": cfg.param_dtype, "attention_impl": cfg.attention_impl,
           "dropout": cfg.dropout_rate, "attention_dropout": cfg.attention_dropout_rate}
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    rules = [tuple(r) for r in config.logical_axis_rules]
    tx, schedule = optimizer.make_optimizer(config)
    axes = get_objective(config.objective).batch_axes
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(axes, rules, (batch, seq), mesh))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    host = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "weights": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))}
    state = compiled = None
    try:
        state, shardings, graphdef = train_state.create_train_state(cfg, tx, mesh, rules, 0)
        step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding)
        with sharding.use_mesh(mesh, rules):
            data = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
            start = time.perf_counter()
            compiled = step.lower(state, data).compile()
            row["compile_s"] = time.perf_counter() - start
            xla_flops = cost_flops(compiled)
            for _ in range(2 if not args.tiny else 1):  # Warm-up: allocation, autotuning.
                state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - start) / args.steps)
            row["loss"] = float(metrics["loss"])
            row["memory"] = compiled_memory(compiled)
            if trace_dir is not None:
                try:
                    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                        for _ in range(2):
                            state, metrics = compiled(state, data)
                        jax.block_until_ready(metrics)
                except Exception as e:  # No profiler here (e.g. CUPTI missing): keep the rest.
                    row["profile_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    except Exception as e:  # Out of memory, mostly: the next configuration still runs.
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return row
    finally:
        del state, compiled
        gc.collect()
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    per_token = flops.flops_per_token(cfg, seq)
    row.update({"step_s": step_s, "tokens_per_s": tokens_per_s,
                "model_flops_per_token": per_token,
                "mfu": tokens_per_s * per_token / (peak * len(devices)),
                # XLA's count of the compiled step (one device's program), remat included.
                "xla_flops_per_step": xla_flops,
                "hfu": xla_flops / step_s / peak if xla_flops else None,
                "process_peak_bytes_in_use": peak_memory(devices[0])})
    return row


def top_ops(trace_dir: pathlib.Path, count: int = 12) -> dict:
    """The ops with the most time in a trace: device ops where the trace has a device (GPU/TPU),
    else the XLA runtime's threads on the host (CPU)."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not files:
        return {"error": f"no trace JSON under {trace_dir}"}
    events = json.loads(gzip.decompress(files[0].read_bytes())).get("traceEvents", [])
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    devices = {pid for pid, n in processes.items() if n.startswith("/device:")}
    op_threads = {key for key, n in threads.items() if key[0] in devices and n == "XLA Ops"}

    def counted(e) -> bool:
        key = (e["pid"], e.get("tid"))
        if op_threads:  # Op-level lines (TPU, and GPU where the converter emits them).
            return key in op_threads
        if devices:  # Kernels on the GPU streams; module/step summary lines double-count.
            return e["pid"] in devices and not threads.get(key, "").startswith(
                ("XLA Modules", "Steps", "Framework", "Source"))
        # CPU: the ops on the executor's threads, not the executor's own spans (waiting).
        return threads.get(key, "").startswith("tf_XLA") and not e["name"].startswith("Thunk")

    # Self time: an event's duration less that of the events nested in it on its thread (a
    # while loop's body, the CPU executor's wrapper around each op).
    spans = sorted((e for e in events if e.get("ph") == "X" and counted(e)),
                   key=lambda e: (e["pid"], e.get("tid"), e["ts"], -e.get("dur", 0.0)))
    totals: dict[str, list[float]] = {}
    stack: list[list] = []  # [end, name, self time] of the enclosing events.

    def close(item: list) -> None:
        entry = totals.setdefault(item[1], [0.0, 0])
        entry[0] += item[2]
        entry[1] += 1

    thread = None
    for e in spans:
        if (e["pid"], e.get("tid")) != thread:
            while stack:
                close(stack.pop())
            thread = (e["pid"], e.get("tid"))
        start, dur = e["ts"], e.get("dur", 0.0)
        while stack and stack[-1][0] <= start:
            close(stack.pop())
        if stack:
            stack[-1][2] -= dur
        stack.append([start + dur, e["name"][:160], dur])
    while stack:
        close(stack.pop())
    all_us = sum(t for t, _ in totals.values()) or 1.0
    kinds: dict[str, float] = {}  # 'fusion.12' and 'fusion.3' are both 'fusion'.
    for name, (t, _) in totals.items():
        kind = re.sub(r"[._]\d+$", "", name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:count]
    return {"source": "device" if devices else "host", "total_ms": all_us / 1e3,
            "ops": [{"name": n, "ms": t / 1e3, "calls": c, "share": t / all_us}
                    for n, (t, c) in ranked],
            "kinds": [{"kind": k, "share": t / all_us}
                      for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])[:count]]}


def train_section(args, devices, peak: float, out: pathlib.Path, profile: bool):
    rows, profiles, traced = [], {}, set()
    for name, batch, remat in args.grid:
        trace_dir = None
        if profile and name not in traced:
            trace_dir = out / "profile" / name
        row = train_one(name, batch, remat, args, devices, peak, trace_dir)
        rows.append(row)
        if trace_dir is not None and "error" not in row:
            traced.add(name)
            trace_files = sorted(str(p) for p in trace_dir.rglob("*") if p.is_file())
            profiles[name] = {"batch": batch, "remat": remat, "trace_dir": str(trace_dir),
                              "trace_files": trace_files, "top": top_ops(trace_dir)}
        print(f"train {name:>8} batch {batch:>3} remat {remat:<13} " + (
            f"{row['tokens_per_s']:10.0f} tokens/s  MFU {row['mfu']:.1%}" if "error" not in row
            else row["error"][:100]), flush=True)
    return rows, profiles


# --- 3. Decoding ------------------------------------------------------------------------------

def decode_section(args) -> list[dict]:
    rows = []
    for name in MODELS:
        cfg = model_config(recipe(name, args.tiny, args.set)).replace(
            dropout_rate=0.0, attention_dropout_rate=0.0)
        model = build_model(cfg, seed=0)
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        for batch in args.decode_batches:
            rng = np.random.default_rng(batch)
            prompts = rng.integers(1, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
            row = {"model": name, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "dtype": cfg.dtype}

            def run(n: int, prompts=prompts, model=model):
                config = SamplingConfig(max_new_tokens=n, temperature=0.0)
                return generate(model, prompts, config, rng=jax.random.key(0)).tokens

            try:
                run(args.new_tokens)  # Compiles; not timed.
                run(1)
                repeats = 3
                total = median_time(lambda: run(args.new_tokens), repeats)
                first = median_time(lambda: run(1), repeats)
            except Exception as e:
                rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                continue
            per_step = max(total - first, 1e-9) / max(args.new_tokens - 1, 1)
            rows.append({**row, "tokens_per_s": batch * args.new_tokens / total,
                         "time_to_first_token_s": first, "total_s": total,
                         "step_ms": 1e3 * per_step,
                         # Decoding reads every weight once a step: its memory bandwidth.
                         "weight_gb_per_s": param_bytes / per_step / 1e9})
            r = rows[-1]
            print(f"decode {name:>8} batch {batch:>3} {r['tokens_per_s']:10.1f} tokens/s  "
                  f"first token {1e3 * first:.1f} ms", flush=True)
        del model
        gc.collect()
    return rows


# --- Runs -------------------------------------------------------------------------------------

def ab_xla_flags(args, out: pathlib.Path) -> dict:
    """The train section once per XLA flags variant (`--ab_repeats` times, interleaved), each run
    in a fresh process (XLA reads its flags once), while this process leaves the accelerator
    alone. Reports the median tokens/s of each configuration and its ratio to the first
    variant's."""
    variants = args.ab_xla_flags.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.ab_repeats):
        for variant in variants:
            folder = out / f"ab_{re.sub('[^A-Za-z0-9]', '_', variant)}_{repeat}"
            command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--sections=train",
                       f"--xla_flags={variant}", f"--size={args.size}", f"--out={folder}",
                       f"--devices={args.devices}", *(f"--grid={g}" for g in args.grid or []),
                       *(f"--set={s}" for s in args.set)]
            for name in ("steps", "rounds", "peak_flops"):
                if getattr(args, name):
                    command.append(f"--{name}={getattr(args, name)}")
            if args.cpu:
                command.append("--cpu")
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            try:
                child = json.loads(lines[-1])
            except (IndexError, ValueError):
                runs[variant].append({"error": (done.stderr or done.stdout)[-1000:]})
                continue
            runs[variant].append(child)
            print(f"xla flags {variant}: " + ", ".join(
                f"{r['model']}/{r['batch']}/{r['remat']} {r.get('tokens_per_s') or 0:.0f} tok/s"
                for r in child["train"]), flush=True)
    results = {}
    for variant, children in runs.items():
        good = [c for c in children if "train" in c]
        if not good:
            results[variant] = {"error": children[0]["error"] if children else "not run"}
            continue
        rows = []
        for i, row in enumerate(good[0]["train"]):
            rates = [c["train"][i].get("tokens_per_s") for c in good]
            rates = [r for r in rates if r]
            rows.append({k: row[k] for k in ("model", "batch", "remat", "error") if k in row}
                        | ({"tokens_per_s": statistics.median(rates), "runs": rates} if rates
                           else {}))
        results[variant] = {"xla_flags": good[0]["xla_flags"], "train": rows}
    base = results.get(variants[0], {}).get("train", [])
    for result in results.values():
        for row, ref in zip(result.get("train", []), base):
            if row.get("tokens_per_s") and ref.get("tokens_per_s"):
                row[f"speedup_vs_{variants[0]}"] = row["tokens_per_s"] / ref["tokens_per_s"]
    return results


def main(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    sections = set() if args.sections == "none" else set(args.sections.split(","))
    unknown = sections - {"equivalence", "train", "decode", "profile"}
    if unknown:
        sys.exit(f"--sections: unknown {sorted(unknown)}")
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="transformer-accelerator-"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.ab_xla_flags:  # Before this process allocates the accelerator's memory.
        result["xla_flags_ab"] = ab_xla_flags(args, out)

    device = jax.devices()[0]
    args.tiny = args.size == "tiny" or (args.size == "auto" and device.platform == "cpu")
    args.grid = parse_grid(args.grid or list(TINY_GRID if args.tiny else DEFAULT_GRID))
    args.steps = args.steps or (3 if args.tiny else 10)
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.prompt_len = args.prompt_len or (8 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    devices = jax.devices() if args.devices == 0 else jax.devices()[:args.devices]
    on_gpu = device.platform == "gpu"
    result.update({"backend": device.platform, "device_kind": device.device_kind,
                   "devices": len(devices), "size": "tiny" if args.tiny else "full",
                   "jax": jax.__version__, "out": str(out)})
    print(f"{len(devices)} × {device.device_kind} ({device.platform}), "
          f"{'tiny' if args.tiny else 'full'} sizes, XLA_FLAGS={result['xla_flags']!r}", flush=True)

    timer = [time.perf_counter(), time.process_time()]

    def lap(section: str) -> None:  # Wall and CPU seconds of each section.
        now = [time.perf_counter(), time.process_time()]
        result.setdefault("section_s", {})[section] = [b - a for a, b in zip(timer, now)]
        timer[:] = now

    if "equivalence" in sections:
        impls = ["xla", "cudnn"] if on_gpu else ["xla"]
        shapes = {n: (2, TINY_SEQ, 4, TINY_MODEL[n].get("num_kv_heads", 4), 16) if args.tiny
                  else {"gpt2": (16, 1024, 12, 12, 64), "llama-1b": (8, 2048, 32, 8, 64)}[n]
                  for n in MODELS}
        checks = attention_equivalence((2, 32, 4, 2, 16) if args.tiny else (2, 512, 8, 2, 64),
                                       impls)
        models = model_equivalence(MODELS, args.tiny, args.set)
        failed = [c for c in checks + models if c["status"] == "fail"]
        result["equivalence"] = {
            "attention": checks, "model": models, "all_passed": not failed,
            "unsupported": sum(c["status"] == "unsupported" for c in checks),
            "attention_speed": attention_speed(shapes, impls, 2 if args.tiny else 10)}
        print(f"equivalence: {len(checks) + len(models) - len(failed)} passed, {len(failed)} "
              f"failed, {result['equivalence']['unsupported']} unsupported", flush=True)
        lap("equivalence")
    if sections & {"train", "profile"}:
        peak = flops.peak_flops(device, args.peak_flops)
        result["peak_flops_per_device"] = peak
        if "train" not in sections:  # Profile only: one configuration per model.
            firsts = {}
            for item in args.grid:
                firsts.setdefault(item[0], item)
            args.grid = list(firsts.values())
        result["train"], profiles = train_section(args, devices, peak, out, "profile" in sections)
        if "profile" in sections:
            result["profile"] = profiles
        lap("train")
    if "decode" in sections:
        result["decode"] = decode_section(args)
        lap("decode")
    # The library's run-time path loads no CPU-only framework (torch, TensorFlow, ...).
    result["cpu_only_modules_loaded"] = [m for m in CPU_ONLY_MODULES if m in sys.modules]
    result["wall_s"] = time.perf_counter() - began
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(ARGS)))
