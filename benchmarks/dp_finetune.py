"""Differentially private fine-tuning: SST-2 with the real all-MiniLM-L6-v2 at ε = 8 and ε = 3
(δ = 1/n), next to the non-private run of the same setting: dev accuracy, ε reached, wall time.

    TRANSFORMER_DATA=/path/to/data python benchmarks/dp_finetune.py [--train_examples=2000]
        [--epochs=2] [--batch=64] [--runs=none,8,3] [--lora_rank=1] [--lora_targets=value]

Every run trains LoRA adapters (rank 1 on the value projections: few trainable parameters, so the
noise, the same on every coordinate, stays small next to the clipped signal) and the head on the same
fixed training subset (n examples drawn from the SST-2 training set) and scores the whole dev set
(872 sentences). The private runs draw Poisson batches of expected size `--batch` (q = batch / n)
for the same number of steps (epochs × n / batch), clip every example's gradient to `--clip`, add
noise with σ calibrated to each target ε by dp_accounting (RDP), and divide by the expected batch;
the non-private run takes shuffled batches of `--batch` with the recipe's global clipping. Wall
time is the whole `train_and_evaluate` call (compilation included; the trainer's compile seconds
are reported apart). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import finetune_parity  # noqa: E402  (the SST-2 subset, the recipe config and the timed run)


def configure(config, args, n: int, epsilon: float | None):
    steps = args.epochs * n // args.batch
    config.num_train_steps = steps
    config.warmup_steps = steps // 10
    config.eval_every = config.checkpoint_every = steps
    config.log_every = max(1, steps // 10)
    config.learning_rate = args.lr
    config.data.global_batch_size = args.batch
    config.data.max_length = args.max_length
    config.model.update(lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                        lora_targets=tuple(args.lora_targets.split(",")), dropout_rate=0.0,
                        attention_dropout_rate=0.0)
    config.finetune.classifier_dropout = 0.0
    config.finetune.pooling = args.pooling
    config.finetune.train_also = r"^head\."
    config.data.pack_examples = False  # Both runs: one example per row.
    if epsilon is not None:
        config.dp.update(enabled=True, target_epsilon=epsilon, clip_norm=args.clip,
                         expected_batch_size=args.batch, microbatch_size=args.microbatch,
                         accountant="rdp")
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="expected examples a step")
    parser.add_argument("--max_length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip norm C")
    parser.add_argument("--microbatch", type=int, default=16, help="dp.microbatch_size")
    parser.add_argument("--pooling", default="mean",
                        help="mean: all-MiniLM-L6-v2's own sentence embedding (its pooler is "
                        "untrained)")
    parser.add_argument("--lora_rank", type=int, default=1)
    parser.add_argument("--lora_targets", default="value", help="comma-separated weight names")
    parser.add_argument("--runs", default="none,8,3",
                        help="'none' (the non-private run) and the target ε of private runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/dp_finetune")
    args = parser.parse_args()

    from transformer import convert
    from transformer.train.config import minilm_dir

    root = pathlib.Path(args.workdir)
    minilm = root / "minilm"
    if not (minilm / "model_config.json").exists():
        convert.import_hf(minilm_dir(), minilm)
    n = args.train_examples
    files = finetune_parity.write_subsets("sst2", root / "data", n, 872)
    runs = {}
    for epsilon in [None if r == "none" else float(r) for r in args.runs.split(",") if r]:
        config, _, _ = finetune_parity.make_config("sst2", files, str(minilm), args.seed,
                                                   str(root / "cache"))
        config = configure(config, args, n, epsilon)
        name = "non_private" if epsilon is None else f"eps_{epsilon:g}"
        result = finetune_parity.run_jax(config, root / "runs" / name)
        metrics = result.pop("metrics")
        runs[name] = {"target_epsilon": epsilon, "eval_accuracy": metrics["eval_accuracy"],
                      **{k: result[k] for k in ("wall_s", "compile_s", "steps_per_s")},
                      **{k: metrics[k] for k in metrics if k.startswith("dp_")}}
        print(f"{name}: accuracy {metrics['eval_accuracy']:.4f}, "
              f"ε {metrics.get('dp_epsilon', float('inf')):.3f}, wall {result['wall_s']:.0f} s",
              flush=True)
    print(json.dumps({"dp_finetune": {
        "train_examples": n, "eval_examples": 872, "epochs": args.epochs,
        "steps": args.epochs * n // args.batch, "expected_batch": args.batch,
        "max_length": args.max_length, "learning_rate": args.lr, "clip_norm": args.clip,
        "lora_rank": args.lora_rank, "lora_targets": args.lora_targets, "pooling": args.pooling,
        "delta": 1 / n,
        "runs": runs}}))


if __name__ == "__main__":
    main()
