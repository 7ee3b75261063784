"""Training throughput and MFU of GPT-2 124M here, side by side with Hugging Face's PyTorch GPT-2.

    python benchmarks/train_throughput.py [--steps=6] [--rounds=2] [--scan=both]

Same model (GPT-2 124M: 12 layers, width 768, vocab 50257, context 1024, tied head, dropout 0),
same batch (4 × 256 tokens of real text: Shakespeare, GPT-2 BPE), same optimizer (AdamW, lr 3e-4,
betas (0.9, 0.95), weight decay 0.1, clip 1.0), float32. Ours runs the project's jitted train step
(the one `transformer.main` uses); theirs is GPT2LMHeadModel + torch.optim.AdamW. The two alternate
in rounds so both see the same machine load; medians of the per-step times are reported. MFU is
model FLOPs (the layer stack and the LM head, see transformer/train/flops.py) over the `jnp.dot` float32
peak measured in the same run. The last line is JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the network.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from transformer import locations, sharding  # noqa: E402
from transformer.data.hf_tokenizers import gpt2_tokenizer  # noqa: E402
from transformer.models import ModelConfig  # noqa: E402
from transformer.train import flops, optimizer, trainer  # noqa: E402
from transformer.train import state as train_state  # noqa: E402
from transformer.train import step as step_lib  # noqa: E402
from transformer.train.config import base_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = locations.data_dir()  # $TRANSFORMER_DATA (docs/data.md)
BATCH, LENGTH, LR = 4, 256, 3e-4


def real_batches(count: int) -> list[np.ndarray]:
    files = DATA / "tokenizers"
    tokenizer = gpt2_tokenizer(files / "encoder.json", files / "vocab.bpe")
    with gzip.open(REPO / "data" / "shakespeare" / "train.txt.gz", "rt") as f:
        text = f.read(2_000_000)
    ids = np.asarray(tokenizer.encode(text), np.int32)
    rows = ids[: len(ids) // (LENGTH + 1) * (LENGTH + 1)].reshape(-1, LENGTH + 1)
    return [rows[i * BATCH:(i + 1) * BATCH] for i in range(count)]


def ours(scan: bool):
    config = base_config("gpt2")
    config.model.update(dict(dropout_rate=0.0, attention_dropout_rate=0.0, scan_layers=scan))
    config.update(dict(learning_rate=LR, warmup_steps=0, schedule="constant", weight_decay=0.1,
                       adam_b1=0.9, adam_b2=0.95, grad_clip_norm=1.0))
    config.data.global_batch_size, config.data.max_length = BATCH, LENGTH
    model_config = ModelConfig.from_dict(config.model.to_dict())
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = [tuple(r) for r in config.logical_axis_rules]
    tx, schedule = optimizer.make_optimizer(config)
    state, shardings, graphdef = train_state.create_train_state(model_config, tx, mesh, rules, 0)
    batch_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding)
    holder = {"state": state}

    def step(rows: np.ndarray) -> float:
        batch = {
            "inputs": rows[:, :-1], "targets": rows[:, 1:],
            "weights": np.ones((BATCH, LENGTH), np.float32),
            "segment_ids": np.ones((BATCH, LENGTH), np.int32),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)),
        }
        with sharding.use_mesh(mesh, rules):
            batch = trainer.to_global(batch, batch_sharding)
            holder["state"], metrics = train_step(holder["state"], batch)
        return float(metrics["loss"])  # Blocks until the step is done.

    return step, model_config


def theirs():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)

    def step(rows: np.ndarray) -> float:
        ids = torch.from_numpy(rows.astype(np.int64))
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step, batches) -> list[float]:
    times = []
    for rows in batches:
        start = time.perf_counter()
        step(rows)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round and contender")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scan", choices=["true", "false", "both"], default="both")
    args = parser.parse_args()
    batches = real_batches(args.steps + 2)
    contenders = {}
    for scan in {"true": [True], "false": [False], "both": [True, False]}[args.scan]:
        step, model_config = ours(scan)
        contenders[f"jax_scan={scan}"] = step
    contenders["pytorch"] = theirs()
    for step in contenders.values():  # Compile / warm up: not timed.
        step(batches[0])
        step(batches[1])
    times = {name: [] for name in contenders}
    with tqdm.tqdm(total=args.rounds * len(contenders) * args.steps, unit="step") as bar:
        for _ in range(args.rounds):
            for name, step in contenders.items():
                for t in timed(step, batches[2:]):
                    times[name].append(t)
                    bar.update()
    peak = flops.measured_matmul_flops()
    per_token = flops.flops_per_token(model_config, LENGTH)
    result = {"batch": BATCH, "length": LENGTH, "matmul_peak_gflops": peak / 1e9}
    for name, ts in times.items():
        tokens_per_s = BATCH * LENGTH / statistics.median(ts)
        result[name] = {"median_step_s": statistics.median(ts), "tokens_per_s": tokens_per_s,
                        "achieved_gflops": tokens_per_s * per_token / 1e9,
                        "fraction_of_matmul_peak": tokens_per_s * per_token / peak}
    best = max((k for k in times if k.startswith("jax")), key=lambda k: result[k]["tokens_per_s"])
    result["best_jax"] = best
    result["speedup_vs_pytorch"] = result[best]["tokens_per_s"] / result["pytorch"]["tokens_per_s"]
    for name in times:
        print(f"{name:>16}: {result[name]['tokens_per_s']:8.1f} tokens/s, "
              f"{result[name]['fraction_of_matmul_peak']:.1%} of the jnp.dot peak")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
