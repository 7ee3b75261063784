"""Distillation on SST-2: teacher accuracy, the distilled 3-layer student, the control, and speed.

    python benchmarks/distill.py [--train_examples=2000] [--epochs=2] [--max_length=64]

1. The teacher: the real all-MiniLM-L6-v2 (imported), fine-tuned by configs/glue.py:sst2.
2. The student: configs/distill.py:sst2, the teacher's layers 0, 2, 4 (and its embeddings, pooler
   and head), trained on α·T²·KL(teacher ‖ student) + (1 − α)·CE.
3. The control: configs/distill.py:control, the same student and initialization, CE alone.
All three see the same training examples (the first --train_examples of a seeded shuffle of
$TRANSFORMER_DATA/sst2/train.tsv, all of them by default) for the same number of steps, and are
scored on the whole SST-2 dev set (872 sentences) by the best checkpoint of each run. Inference
speed: the jitted forward pass of the teacher and of the student, side by side in this process,
on dev batches (median of --speed_repeats passes over --speed_batches batches).
The last line printed is one JSON object with every figure.

With --transfer_examples, the distilled student (configs/distill.py:sst2,transfer) also learns
from the teacher alone on that many further training sentences (the next rows of the shuffle,
their labels blanked to "0"), --transfer_batch_size of them added to each step; the control gets
the same labelled batches for the same number of steps. --data_seed fixes the subsets (and, with
--teacher, must be the one the teacher was trained on) while --seeds vary order and dropout.

Measured on a shared, heavily loaded 2-core CPU (max_length 64, batch 32, lr 1e-4; every student
selected at its best of 3 dev evaluations; the full dev set, 872 sentences):

    python benchmarks/distill.py --train_examples=1000 --epochs=3 --evals_per_epoch=1 \
        --max_length=64 --teacher_lr=1e-4 --student_lr=1e-4 --seeds=0     # the teacher
    python benchmarks/distill.py --teacher=WORK/seed0/teacher/best --data_seed=0 --seeds=S \
        --train_examples=1000 --transfer_examples=2304 --transfer_batch_size=32 \
        --student_steps=72 --epochs=3 --evals_per_epoch=1 --max_length=64 --student_lr=1e-4 \
        --alpha=0.7 --temperature=2 --beta=1.0                           # S = 0, 1, 2

  teacher (1,000 labelled examples, 93 steps, seed 0 only)       80.73 %
  distilled, 72 steps (32 labelled + 32 transfer a step),
    α 0.7, T 2, β 1, seeds 0/1/2: 77.41 / 76.61 / 76.38 %  mean 76.80 % (95.1 % of the teacher)
  control, the same 72 labelled batches, seeds 0/1/2:
                                 75.80 / 76.83 / 76.83 %  mean 76.49 %  (distilled +0.31 points)
  student inference / teacher's, interleaved: 2.32× / 1.81× / 2.04×  (mean 2.06×)

The targets (≥ 97 % of the teacher, +1 point over the control) are not met at this size. Earlier,
without a transfer set (seed 0, one teacher of 79.93 %, 2 epochs = 62 steps: distilled 76.95 %,
control 76.61 %; 4 epochs: 78.10 % and 78.10 %; α 0.9, T 4, 4 epochs: 77.41 %). A run of 125
steps with 4,000 transfer sentences was stopped for time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def recipe(name: str, variant: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def subset(source: pathlib.Path, target: pathlib.Path, n: int | None, seed: int,
           skip: int = 0, label: str | None = None) -> int:
    """Rows `skip` to `skip + n` of a seeded shuffle of `source` (all rows for n None), in file
    order; with `label`, every row's label column replaced by it (a transfer set: the student
    never reads its labels, and this shows it)."""
    header, *rows = source.read_text().splitlines(keepends=True)
    if n is not None and skip + n <= len(rows):
        order = np.random.default_rng(seed).permutation(len(rows))[skip:skip + n]
        rows = [rows[i] for i in sorted(order)]
    if label is not None:
        column = header.rstrip("\n").split("\t").index("label")
        rows = ["\t".join(label if i == column else f for i, f in
                          enumerate(r.rstrip("\n").split("\t"))) + "\n" for r in rows]
    target.write_text(header + "".join(rows))
    return len(rows)


def configure(c, args, files, examples, cache, seed, steps=None):
    from transformer.train.config import epoch_schedule

    c.data.local_files = {k: str(v) for k, v in files.items() if k != "transfer"}
    c.data.max_length = args.max_length
    c.data.global_batch_size = args.batch_size
    c.data.cache_dir = str(cache)
    c.seed = c.data.seed = seed
    epoch_schedule(c, examples, args.epochs, evals_per_epoch=args.evals_per_epoch)
    if steps:  # The students: a fixed number of steps, evaluated as often as the teacher.
        c.num_train_steps, c.warmup_steps = steps, steps // 10
        c.eval_every = c.checkpoint_every = max(1, steps // (args.epochs * args.evals_per_epoch))
    c.log_every = 20
    c.async_checkpointing = False
    return c


def run(config, workdir: pathlib.Path) -> dict:
    from transformer.train import trainer

    start = time.perf_counter()
    out = trainer.train_and_evaluate(config, workdir)
    record = out["best"] or {}
    return {"best_eval_accuracy": record.get("value"), "best_step": record.get("step"),
            "last_eval_accuracy": out["metrics"].get("eval_accuracy"),
            "steps": config.num_train_steps, "train_seconds": time.perf_counter() - start}


def speed(teacher_dir: str, student_dir: str, dev: str, args) -> dict:
    """Median seconds per pass of the jitted forward over the same dev batches."""
    import jax
    from flax import nnx

    from transformer import model_io
    from transformer.data import pipeline
    from transformer.data.tokenizer import load_tokenizer
    from transformer.models.heads import HeadConfig, TaskModel
    from transformer.train import objectives

    c = recipe("glue", "sst2")
    c.data.local_files = {"train": dev, "validation": dev}
    c.data.max_length = args.max_length
    c.data.global_batch_size = args.batch_size
    c.data.cache_dir = str(pathlib.Path(args.workdir) / "cache")
    tokenizer = load_tokenizer(str(pathlib.Path(teacher_dir) / model_io.TOKENIZER_DIR))
    batches = pipeline.create_eval_batches(c.data, "validation", tokenizer=tokenizer).batches
    batches = [{k: jax.numpy.asarray(v) for k, v in b.items()}
               for b in batches[: args.speed_batches]]

    def load(directory):
        config = model_io.read_config(directory)
        head = HeadConfig(**json.loads((pathlib.Path(directory) / "head_config.json").read_text()))
        model = nnx.eval_shape(lambda: TaskModel(config, head, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        params = model_io.load_params(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        fn = jax.jit(lambda p, b: objectives.forward(nnx.merge(graphdef, p), b)["logits"])
        return config, params, fn

    models = {"teacher": load(teacher_dir), "student": load(student_dir)}
    for _, params, fn in models.values():  # Compile.
        fn(params, batches[0]).block_until_ready()
    times = {name: [] for name in models}
    for _ in range(args.speed_repeats):  # Interleaved, so both see the same machine load.
        for name, (_, params, fn) in models.items():
            start = time.perf_counter()
            for b in batches:
                out = fn(params, b)
            out.block_until_ready()
            times[name].append(time.perf_counter() - start)
    examples = len(batches) * args.batch_size
    result = {f"{n}_examples_per_s": examples / float(np.median(t)) for n, t in times.items()}
    result["speedup"] = result["student_examples_per_s"] / result["teacher_examples_per_s"]
    result["layers"] = {n: m[0].num_layers for n, m in models.items()}
    result["speed_batches"], result["speed_length"] = len(batches), args.max_length
    return result


def one_seed(args, seed: int, minilm: pathlib.Path, data: pathlib.Path) -> dict:
    """Teacher, students and speed on one seed's labelled subset (and transfer set)."""
    work = pathlib.Path(args.workdir) / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    files = {"train": work / "train.tsv", "validation": work / "dev.tsv"}
    data_seed = seed if args.data_seed is None else args.data_seed
    examples = subset(data / "train.tsv", files["train"], args.train_examples, data_seed)
    subset(data / "dev.tsv", files["validation"], None, data_seed)
    results = {"seed": seed, "data_seed": data_seed, "train_examples": examples}
    if args.transfer_examples:  # The next rows of the same shuffle, labels blanked to "0".
        files["transfer"] = work / "transfer.tsv"
        results["transfer_examples"] = subset(data / "train.tsv", files["transfer"],
                                              args.transfer_examples, data_seed, skip=examples,
                                              label="0")
    cache = work / "cache"

    teacher = args.teacher
    if not teacher:
        c = configure(recipe("glue", "sst2"), args, files, examples, cache, seed)
        c.init_from = str(minilm)
        if args.teacher_lr is not None:
            c.learning_rate = args.teacher_lr
        results["teacher"] = run(c, work / "teacher")
        teacher = str(work / "teacher" / "best")
        print("teacher", results["teacher"], flush=True)
    steps = args.student_steps or (args.transfer_examples * args.transfer_epochs
                                   // args.transfer_batch_size if args.transfer_examples else None)
    for name in args.runs.split(","):
        distilled = name != "control"
        variant = ("sst2,transfer" if args.transfer_examples else "sst2") if distilled else "control"
        c = configure(recipe("distill", variant), args, files, examples, cache, seed, steps)
        c.distill.teacher = teacher
        if distilled:
            for key in ("alpha", "beta", "temperature"):
                if getattr(args, key) is not None:
                    c.distill[key] = getattr(args, key)
            if args.transfer_examples:
                c.distill.transfer_file = str(files["transfer"])
                c.distill.transfer_batch_size = args.transfer_batch_size
        if args.student_lr is not None:
            c.learning_rate = args.student_lr
        results[name] = run(c, work / name)
        results[name].update(
            alpha=c.distill.alpha, beta=c.distill.beta, temperature=c.distill.temperature,
            learning_rate=c.learning_rate, layers=c.distill.student_layers,
            transfer_batch_size=c.distill.transfer_batch_size)
        print(name, results[name], flush=True)
    student = work / args.runs.split(",")[0] / "best"
    results["speed"] = speed(teacher, str(student), str(files["validation"]), args)
    t = results.get("teacher", {}).get("best_eval_accuracy")
    k = results.get("control", {}).get("best_eval_accuracy")
    for name in args.runs.split(","):
        d = results[name]["best_eval_accuracy"]
        if t and d and name != "control":
            results[f"{name}_over_teacher"] = d / t
        if k and d and name != "control":
            results[f"{name}_minus_control_points"] = 100 * (d - k)
    print(json.dumps(results), flush=True)
    return results


def summary(per_seed: list[dict], runs: list[str]) -> dict:
    """Mean and range over seeds of each run's accuracy, the ratios and the speed-up."""
    def stats(values):
        values = [v for v in values if v is not None]
        return {"mean": float(np.mean(values)), "min": float(np.min(values)),
                "max": float(np.max(values)), "n": len(values)} if values else None

    out = {name: stats([r.get(name, {}).get("best_eval_accuracy") for r in per_seed])
           for name in ["teacher", *runs]}
    out["speedup"] = stats([r["speed"]["speedup"] for r in per_seed])
    for name in runs:
        if name != "control" and out["teacher"] and out[name]:
            out[f"{name}_over_teacher"] = out[name]["mean"] / out["teacher"]["mean"]
        if name != "control" and out.get("control") and out[name]:
            out[f"{name}_minus_control_points"] = 100 * (out[name]["mean"]
                                                         - out["control"]["mean"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_examples", type=int, default=None,
                   help="labelled examples (default: all 67,349)")
    p.add_argument("--transfer_examples", type=int, default=0,
                   help="more training sentences, labels blanked, learnt from the teacher alone")
    p.add_argument("--transfer_batch_size", type=int, default=32)
    p.add_argument("--transfer_epochs", type=int, default=1,
                   help="the students' steps: passes over the transfer set")
    p.add_argument("--student_steps", type=int, default=None,
                   help="default: --transfer_epochs over the transfer set, or the teacher's")
    p.add_argument("--epochs", type=int, default=3, help="the teacher's (and the evaluations')")
    p.add_argument("--evals_per_epoch", type=int, default=2)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seeds", default="0", help="comma-separated; each its own subsets and runs")
    p.add_argument("--data_seed", type=int, default=None,
                   help="the subsets' seed for every run (default: each run's seed); with "
                        "--teacher, the one its training set was drawn with")
    p.add_argument("--alpha", type=float, default=None, help="default: the recipe's")
    p.add_argument("--beta", type=float, default=None, help="default: the recipe's")
    p.add_argument("--temperature", type=float, default=None, help="default: the recipe's")
    p.add_argument("--teacher_lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--student_lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--teacher", default="", help="a fine-tuned teacher (skip step 1)")
    p.add_argument("--runs", default="distilled,control", help="the student runs to make")
    p.add_argument("--speed_batches", type=int, default=8)
    p.add_argument("--speed_repeats", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/distill_benchmark")
    args = p.parse_args()

    from absl import logging as absl_logging

    from transformer import convert, locations
    from transformer.train.config import minilm_dir

    absl_logging.set_verbosity(absl_logging.WARNING)
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    minilm = work / "minilm"
    if not args.teacher and not (minilm / "config.json").is_file():
        convert.import_hf(minilm_dir(), minilm)
    data = locations.dataset("sst2")
    per_seed = [one_seed(args, int(seed), minilm, data) for seed in args.seeds.split(",")]
    result = {"max_length": args.max_length, "batch_size": args.batch_size,
              "epochs": args.epochs, "seeds": per_seed,
              "summary": summary(per_seed, args.runs.split(","))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
