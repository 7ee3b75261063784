"""Ahead-of-time compilation of the full train step for a TPU topology, on any machine.

    python -m transformer.aot --config=configs/gpt2_pretrain.py --topology=v5p-256
    python -m transformer.aot --preset=llama-7b --topology=v5p-64 --config.mesh.tensor=4
    python -m transformer.aot --config=configs/demo.py:ci --topology=v5e:2x2 --json
    python -m transformer.aot --preset=llama-7b --topology=v5e-8 --inference --quantize=int8

Builds the abstract train state and batch with the shardings the trainer would use on that
topology's devices and the recipe's mesh, lowers and compiles the train step with libtpu, and
prints per-device memory against the chip's HBM. When it does not fit, it compiles candidate
changes (transformer.aot_search: more gradient accumulation, stronger remat, more FSDP, a smaller
batch) and prints the smallest that fits as `--config.x=y` overrides. Exits 1 when the config as
given does not fit, 2 on bad usage. `--inference` compiles a decoder's forward pass over a batch
of prompts (next-token logits, no optimizer state) instead, with the weights in
`model.param_dtype` or, with `--quantize=int8|int4`, quantized as `transformer.quantize` holds
them: the memory that serving the model needs on that slice.
Needs libtpu (`pip install libtpu==0.0.42.1`, the version jax 0.10.2 pins); no TPU is needed.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import re
import sys
import time
import types
from typing import Any

from transformer.aot_memory import (
    GIB,
    Topology,
    format_report,
    memory_report,
    parse_topology,
    per_device_bytes,
)
from transformer.aot_search import Search, format_overrides

LIBTPU_INSTALL = "pip install libtpu==0.0.42.1"
# Presets beyond transformer.models.PRESETS, shaped like published models, for capacity planning.
EXTRA_PRESETS = {
    # Llama-2-70B: GQA 64/8, SwiGLU width 28672.
    "llama-70b": ("llama-7b", dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                   mlp_dim=28672)),
}


class DoesNotFit(RuntimeError):
    """The compiler ran out of HBM for this program on this topology."""


def _set_tpu_env(topology: Topology) -> None:
    # Must precede the first libtpu load. JAX_PLATFORMS=cpu keeps jax's default backend on the CPU
    # (no TPU to open); libtpu is then used only as the compiler for the described topology.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["TPU_ACCELERATOR_TYPE"] = topology.accelerator_type
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Other jax processes may hold it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """The (virtual) devices of `num_slices` slices of `topology`, to build a mesh over."""
    if importlib.util.find_spec("libtpu") is None:
        raise ModuleNotFoundError(
            f"ahead-of-time TPU compilation needs libtpu: {LIBTPU_INSTALL} (CPU-only machines too)")
    _set_tpu_env(topology)
    from jax.experimental import topologies

    extra = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=num_slices, **extra)
    return list(desc.devices)


def preset_config(name: str) -> Any:
    """A trainer config for a model preset (or EXTRA_PRESETS) with pretraining-like settings:
    bfloat16 compute, full rematerialization, the model's usual sequence length."""
    from transformer.train.config import base_config

    base, overrides = EXTRA_PRESETS.get(name, (name, {}))
    config = base_config(base)
    config.model.update(overrides)
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "full"
    config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
    config.data.max_length = min(config.model.max_length, 4096)
    return config


def lower_train_step(config: Any, devices: list[Any]) -> tuple[Any, Any, Any, Any]:
    """(lowered step, mesh, abstract state, abstract batch) for `config` on `devices`."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from transformer import sharding
    from transformer.models import ModelConfig
    from transformer.train import optimizer
    from transformer.train import state as train_state
    from transformer.train import step as step_lib
    from transformer.train.trainer import check_batch

    model_config = ModelConfig.from_dict(config.model.to_dict())
    rules = [tuple(r) for r in config.logical_axis_rules]
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    check_batch(config, mesh)
    tx, schedule = optimizer.make_optimizer(config)
    shapes = jax.eval_shape(train_state.make_run_init_fn(config, model_config, tx))
    params_sharding = train_state.param_shardings(model_config, mesh, rules)
    shardings = train_state.state_shardings(shapes, params_sharding, mesh)
    abstract_state = train_state.abstract_state(shapes, shardings)
    graphdef = nnx.graphdef(train_state.abstract_model(model_config))
    batch_shape = (config.data.global_batch_size, config.data.max_length)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "length"), rules, batch_shape, mesh))
    dtypes = {"inputs": "int32", "targets": "int32", "weights": "float32",
              "segment_ids": "int32", "positions": "int32"}
    batch = {k: jax.ShapeDtypeStruct(batch_shape, d, sharding=batch_sharding)
             for k, d in dtypes.items()}
    step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding)
    with sharding.use_mesh(mesh, rules):
        lowered = step.lower(abstract_state, batch)
    return lowered, mesh, abstract_state, batch


def lower_forward(config: Any, devices: list[Any],
                  quantize: str | None = None) -> tuple[Any, Any, Any, Any]:
    """(lowered forward, mesh, abstract weights, abstract batch): a decoder's next-token logits
    for a batch of `data.max_length`-token prompts, the weights (quantized with `quantize`)
    sharded by the rules. Shapes only: no weight is materialized."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from transformer import quantize as q
    from transformer import sharding
    from transformer.models import MODELS, ModelConfig

    model_config = ModelConfig.from_dict(config.model.to_dict())
    if not model_config.causal:
        raise ValueError(f"--inference compiles next-token prediction; {model_config.architecture} "
                         "is not a decoder")
    rules = [tuple(r) for r in config.logical_axis_rules]
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    batch_shape = (config.data.global_batch_size, config.data.max_length)

    def build():
        model = MODELS[model_config.architecture](model_config, rngs=nnx.Rngs(0))
        return model if quantize is None else q.quantize(model, quantize)

    graphdef, weights = nnx.split(nnx.eval_shape(build), nnx.Param)
    shardings = q.state_shardings(weights, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            weights, shardings)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "length"), rules, batch_shape, mesh))
    inputs = jax.ShapeDtypeStruct(batch_shape, "int32", sharding=batch_sharding)

    def forward(weights, inputs):
        model = nnx.merge(graphdef, weights)
        hidden = model(inputs, compute_logits=False).last_hidden_state
        return model.lm_logits(hidden[:, -1:])

    jitted = jax.jit(forward, in_shardings=(shardings, batch_sharding))
    with sharding.use_mesh(mesh, rules):
        lowered = jitted.lower(abstract, inputs)
    return lowered, mesh, abstract, inputs


def run_inference(config: Any, topology: Topology, quantize: str | None = None,
                  num_slices: int = 1) -> dict[str, Any]:
    """Compiles the forward pass of `lower_forward` and measures it: the report dict, its
    optimizer state 0, also when the compiler says it does not fit."""
    from transformer import sharding
    from transformer.models import ModelConfig, count_params

    devices = topology_devices(topology, num_slices)
    result: dict[str, Any] = {
        "mode": "inference", "quantize": quantize or config.model.param_dtype,
        "topology": topology.accelerator_type, "topology_grid": topology.name,
        "num_slices": num_slices, "devices": len(devices),
        "params": count_params(ModelConfig.from_dict(config.model.to_dict())),
        "global_batch_size": config.data.global_batch_size, "seq_len": config.data.max_length,
        "grad_accum_steps": 1, "remat_policy": config.model.remat_policy,
    }
    start = time.perf_counter()
    lowered, mesh, weights, inputs = lower_forward(config, devices, quantize)
    result["mesh"] = dict(mesh.shape)
    result["rows_per_device"] = config.data.global_batch_size // sharding.batch_devices(mesh)
    state = types.SimpleNamespace(params=weights, opt_state=())  # As memory_report reads it.
    try:
        compiled = compile_lowered(lowered)
    except DoesNotFit as error:
        result.update(fits=False, error=str(error), hbm_bytes=topology.hbm_bytes,
                      params_bytes=per_device_bytes(weights), optimizer_bytes=0,
                      batch_bytes=per_device_bytes(inputs),
                      compile_s=round(time.perf_counter() - start, 1))
        return result
    result["compile_s"] = round(time.perf_counter() - start, 1)
    result.update(memory_report(compiled.memory_analysis(), state, inputs, topology.hbm_bytes))
    return result


# The TPU compiler's refusal names what it needed: "... HLO temporaries (280.03G) exceeds ...".
_OOM_NEED = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def compile_lowered(lowered: Any) -> Any:
    try:
        return lowered.compile()
    except Exception as error:  # XlaRuntimeError; its type moves between jax versions.
        if "RESOURCE_EXHAUSTED" in str(error) or "HbmOom" in str(error):
            raise DoesNotFit(str(error).strip().splitlines()[0][:600]) from error
        raise


def compile_train_step(config: Any, devices: list[Any]) -> tuple[Any, Any, Any, Any]:
    """(compiled step, mesh, abstract state, abstract batch) for `config` on `devices`."""
    lowered, mesh, abstract_state, batch = lower_train_step(config, devices)
    return compile_lowered(lowered), mesh, abstract_state, batch


def oom_temporaries(message: str) -> int | None:
    """Bytes of temporaries the compiler asked for in a does-not-fit message (None: not said)."""
    match = _OOM_NEED.search(message)
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def apply_overrides(config: Any, overrides: list[str]) -> None:
    """`--config.a.b=value` on the command line: literals (numbers, tuples, True) or strings."""
    for item in overrides:
        key, sep, text = item[len("--config."):].partition("=")
        if not sep:
            raise ValueError(f"override {item!r} needs a value: --config.{key}=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown config field {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[leaf] = value


def run(config: Any, topology: Topology, num_slices: int = 1,
        per_device_batch: int = 0) -> dict[str, Any]:
    """Compiles and measures; the report dict (also when the compiler says it does not fit).
    `per_device_batch` > 0 sets the global batch to that many rows per data-parallel device.
    A config the trainer would refuse (a batch that does not split) raises ValueError."""
    from transformer import sharding
    from transformer.models import ModelConfig, count_params
    from transformer.train import trainable

    devices = topology_devices(topology, num_slices)
    if per_device_batch:
        mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
        config.data.global_batch_size = per_device_batch * sharding.batch_devices(mesh)
    result: dict[str, Any] = {
        "topology": topology.accelerator_type, "topology_grid": topology.name,
        "num_slices": num_slices, "devices": len(devices),
        "params": count_params(ModelConfig.from_dict(config.model.to_dict())),
        "global_batch_size": config.data.global_batch_size, "seq_len": config.data.max_length,
        "grad_accum_steps": config.grad_accum_steps, "remat_policy": config.model.remat_policy,
    }
    start = time.perf_counter()
    lowered, mesh, abstract_state, batch = lower_train_step(config, devices)
    data_parallel = sharding.batch_devices(mesh)
    result["mesh"] = dict(mesh.shape)
    # Rows of data.max_length tokens that one device holds at a time (one microbatch).
    result["rows_per_device"] = (config.data.global_batch_size // data_parallel
                                 // config.grad_accum_steps)
    state = {"params_bytes": per_device_bytes(abstract_state.params),
             "optimizer_bytes": per_device_bytes(abstract_state.opt_state),
             "batch_bytes": per_device_bytes(batch)}
    # Gradients exist for the trainable part only (all of it, or LoRA's adapters).
    trains = trainable.predicate(config)
    result["grad_bytes"] = per_device_bytes(trainable.split(abstract_state.params, trains)[0])
    try:
        compiled = compile_lowered(lowered)
    except DoesNotFit as error:
        result.update(fits=False, error=str(error), hbm_bytes=topology.hbm_bytes, **state,
                      compile_s=round(time.perf_counter() - start, 1))
        if (temporaries := oom_temporaries(str(error))) is not None:
            result["required_bytes"] = temporaries + sum(state.values())
        return result
    result["compile_s"] = round(time.perf_counter() - start, 1)
    result.update(memory_report(compiled.memory_analysis(), abstract_state, batch,
                                topology.hbm_bytes))
    return result


def suggest(config: Any, topology: Topology, report: dict[str, Any], num_slices: int = 1,
            max_compiles: int = 8, log: Any = print) -> tuple[dict[str, Any] | None, list]:
    """The smallest change that fits (transformer.aot_search), each candidate compiled; returns
    (suggestion or None, every compile tried)."""
    def measure(overrides: dict[str, Any]) -> dict[str, Any] | None:
        candidate = copy.deepcopy(config)
        apply_overrides(candidate, format_overrides(overrides))
        try:
            return run(candidate, topology, num_slices)
        except ValueError:  # The batch does not split over the devices × microbatches.
            return None

    search = Search(config, report, measure, max_compiles=max_compiles, log=log)
    return search.run(), search.tried


def _describe(report: dict[str, Any]) -> str:
    return (f"{report['global_batch_size']} × {report['seq_len']} in {report['grad_accum_steps']} "
            f"microbatch(es), {report['rows_per_device']} rows per device at a time, remat "
            f"{report['remat_policy']}, mesh {report['mesh']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.aot", description=__doc__.split("\n\n")[0],
        epilog="Any --config.FIELD=VALUE overrides a field of the recipe or preset config.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="recipe file[:variant], e.g. configs/gpt2_pretrain.py")
    source.add_argument("--preset", help="a model preset instead of a recipe (also: llama-70b)")
    parser.add_argument("--topology", required=True,
                        help="v5p-256, v5litepod-16 (= v5e-16), v6e-8, v4-32, or v5e:2x2, v5p:4x4x8")
    parser.add_argument("--num_slices", type=int, default=1, help="multislice: slices over DCN")
    parser.add_argument("--per_device_batch", type=int, default=0,
                        help="set data.global_batch_size to this × the data-parallel devices")
    parser.add_argument("--search_compiles", type=int, default=8,
                        help="when it does not fit: compile at most this many candidate changes "
                             "to find the smallest that fits (0 = no search)")
    parser.add_argument("--inference", action="store_true",
                        help="compile a decoder's forward pass over a batch of prompts (next-token "
                             "logits) instead of the train step: the memory of serving it")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="with --inference: the weights quantized (transformer.quantize)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if bad := [a for a in rest if not a.startswith("--config.")]:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        topology = parse_topology(args.topology)
        if args.config:
            from transformer.main import load_recipe

            config = load_recipe(args.config)
        else:
            config = preset_config(args.preset)
        apply_overrides(config, rest)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.error(str(error))
    except Exception as error:  # A recipe's own usage error (absl UsageError).
        parser.error(f"{type(error).__name__}: {error}")
    if args.quantize and not args.inference:
        parser.error("--quantize compiles quantized inference: add --inference")
    if args.inference and args.per_device_batch:
        parser.error("--per_device_batch is for the train step; with --inference set "
                     "--config.data.global_batch_size")
    try:
        if args.inference:
            result = run_inference(config, topology, args.quantize, args.num_slices)
        else:
            result = run(config, topology, args.num_slices, args.per_device_batch)
    except ModuleNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.preset or args.config
    print(f"{name}: {result['params'] / 1e6:.1f}M parameters, batch {result['global_batch_size']} × "
          f"{result['seq_len']}, on {topology.accelerator_type} ({topology.name}, "
          f"{result['devices']} devices" + (f", {args.num_slices} slices" if args.num_slices > 1
                                            else "") + ")")
    print(f"  {_describe(result)}; compiled in {result['compile_s']} s")
    if "error" in result:
        print(f"  does not fit: the compiler ran out of HBM: {result['error']}")
    else:
        print(format_report(result))
    if args.inference:
        print(f"  weights: {result['quantize']}")
    elif not result["fits"] and args.search_compiles > 0:
        print(f"  searching for the smallest change that fits (at most {args.search_compiles} "
              "compiles):", flush=True)
        log = lambda line: print(line, flush=True)
        suggestion, tried = suggest(config, topology, result, args.num_slices,
                                    args.search_compiles, log)
        result["search"] = tried
        if suggestion is None:
            print(f"  no change found within {len(tried)} compiles: the state alone may not fit "
                  "this slice; try a larger topology, or more --search_compiles")
        else:
            found = suggestion.pop("report")
            peak = suggestion["peak_bytes"]
            overrides = " ".join(suggestion["overrides"])
            print(f"  suggestion: {overrides}")
            print(f"    {_describe(found)}: peak {peak / GIB:.2f} GiB of "
                  f"{suggestion['hbm_bytes'] / GIB:.0f} GiB ({peak / suggestion['hbm_bytes']:.0%})"
                  ": fits" + ("; this changes the global batch: re-tune the learning rate"
                              if suggestion["changes_training"] else ""))
            replaced = tuple(o.split("=")[0] + "=" for o in suggestion["overrides"])
            keep = [a for a in argv if not a.startswith(replaced) and not (
                suggestion["changes_training"] and a.startswith("--per_device_batch"))]
            print(f"    python -m transformer.aot {' '.join(keep)} {overrides}")
            result["suggestion"] = suggestion
    if args.json:
        print(json.dumps(result))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
