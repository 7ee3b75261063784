"""Training throughput of the `:tiny` mixture-of-experts recipe here: dropless vs the dense
reference execution, and against the dense model of the same active parameters.

    python benchmarks/moe_throughput.py [--steps=5] [--rounds=3]

Models (configs/moe_pretrain.py:tiny): 2 layers, width 128, vocab 4096, 4 experts of width 128,
top-2 — so a token uses two expert MLPs of width 128, as many weights as the dense Llama-style MLP
of width 256 it is compared with (the router adds 128 × 4 per layer). Batch 16 × 128 tokens,
float32, AdamW; the project's jitted train step (the one `transformer.main` runs). Token ids are
random: throughput does not depend on them. The three alternate in rounds so all see the same
machine load; medians of per-step times. The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run from anywhere.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

# The script's own folder: a site-packages 'benchmarks' package may shadow this one.
from timing import median_time  # noqa: E402

from transformer import sharding  # noqa: E402
from transformer.models import ModelConfig, count_params  # noqa: E402
from transformer.train import optimizer, trainable, trainer  # noqa: E402
from transformer.train import state as train_state  # noqa: E402
from transformer.train import step as step_lib  # noqa: E402

BATCH, LENGTH = 16, 128


def recipe(**model_changes):
    spec = importlib.util.spec_from_file_location("moe_pretrain", REPO / "configs" / "moe_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.model.update(model_changes)
    config.data.global_batch_size, config.data.max_length = BATCH, LENGTH
    return config


def variants():
    moe = recipe()
    dense_width = moe.model.num_experts_per_token * moe.model.mlp_dim
    return {"moe_dropless": moe, "moe_dense_reference": recipe(moe_impl="dense"),
            "dense_same_active": recipe(num_experts=0, mlp_dim=dense_width)}


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, 4096, (BATCH, LENGTH)).astype(np.int32)
    weights = np.ones((BATCH, LENGTH), np.float32)
    weights[:, -1] = 0
    return dict(inputs=inputs, targets=np.roll(inputs, -1, 1), weights=weights,
                segment_ids=np.ones_like(inputs), positions=np.broadcast_to(
                    np.arange(LENGTH, dtype=np.int32), inputs.shape).copy())


def make_runner(config, mesh=None):
    """A function that runs one train step on `mesh` (default: one device) and waits for it."""
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = [tuple(r) for r in config.logical_axis_rules]
    model_config = ModelConfig.from_dict(config.model.to_dict())
    tx, schedule = optimizer.make_optimizer(config)
    state, shardings, graphdef = train_state.create_train_state(
        model_config, tx, mesh, rules, config.seed, trainable.predicate(config), "")
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "length"), rules, (BATCH, LENGTH), mesh))
    step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding)
    data = trainer.to_global(batch(), batch_sharding)
    holder = {"state": state}

    def run():
        with sharding.use_mesh(mesh, rules):
            holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    run()  # Compile.
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs = variants()
    runners = {name: make_runner(c) for name, c in tqdm.tqdm(configs.items(), desc="compile")}
    times = {name: [] for name in configs}
    for _ in tqdm.trange(args.rounds, desc="rounds"):
        for name, run in runners.items():
            times[name].append(median_time(run, args.steps))
    result = {}
    for name, config in configs.items():
        seconds = statistics.median(times[name])
        result[name] = {"step_ms": round(1000 * seconds, 2),
                        "tokens_per_s": round(BATCH * LENGTH / seconds),
                        "params": count_params(ModelConfig.from_dict(config.model.to_dict()))}
    base = result["dense_same_active"]["tokens_per_s"]
    print(f"{'variant':22s} {'params':>9s} {'step ms':>9s} {'tokens/s':>9s} {'vs dense':>9s}")
    for name, row in result.items():
        print(f"{name:22s} {row['params']:9d} {row['step_ms']:9.2f} {row['tokens_per_s']:9d} "
              f"{row['tokens_per_s'] / base:9.2f}")
    print(json.dumps({"batch": BATCH, "length": LENGTH, "devices": "1 CPU", **result}))


if __name__ == "__main__":
    main()
