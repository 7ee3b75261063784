"""Fine-tuning parity: our JAX trainer vs Hugging Face PyTorch, from the real all-MiniLM-L6-v2.

    python benchmarks/finetune_parity.py [--seeds=1] [--tasks=sst2,conll2003,squad,semeval]
                                         [--full] [--pack=1]

For each task, a fixed training subset of the real data is fine-tuned by `transformer.main`'s
trainer (the recipe in configs/ with --config.init_from=<converted MiniLM>) and by transformers'
BertForSequenceClassification / BertForTokenClassification / BertForQuestionAnswering (a linear
head on the two entity-start states over BertModel for relations). Both consume the very same
examples in the same order (drawn from our pipeline): ours as the recipe batches them (packed
rows, `data.pack_examples`; --pack=0 pads every example to max_length), PyTorch with its usual
dynamic padding (each batch cut to its longest example, as DataCollatorWithPadding). `--full`
trains SST-2 on the whole training set (67,349 sentences, one epoch) and scores the whole dev set.
Wall times include compilation: the first seed compiles into an empty persistent compilation
cache, later seeds read it (both are reported, with the compile seconds the trainer logs).
Same hyperparameters (AdamW,
β=(0.9, 0.999), ε=1e-8, weight decay 0.01 except biases and LayerNorm, 10% warmup then linear
decay, clipping at 1, dropout 0.1 unless --dropout), and are scored by the same metric code on
the same fixed evaluation subset. PyTorch's new head starts from a copy of ours (--same_head_init),
so the runs of one seed differ only in their dropout draws and in floating-point rounding; with
--dropout=0 only in rounding, which checks the two implementations step for step.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the network.
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from transformer import locations  # noqa: E402

DATA = locations.data_dir()  # $TRANSFORMER_DATA (docs/data.md)

# task: (recipe, variant, train size, eval size, epochs, batch, max_length, learning rate)
TASKS = {
    "sst2": ("glue", "sst2", 1500, 872, 1, 32, 64, 1e-4),
    "conll2003": ("ner", "conll2003", 600, 400, 2, 16, 64, 1e-4),
    "squad": ("squad", "squad", 500, 200, 1, 16, 192, 1e-4),
    "semeval": ("relation", "semeval", 800, 500, 2, 32, 96, 1e-4),
}


def write_subsets(task: str, root: pathlib.Path, n_train: int, n_eval: int) -> dict[str, str]:
    """The fixed subsets, as files in the task's own format; {split: path}."""
    root.mkdir(parents=True, exist_ok=True)
    if task == "sst2":
        rng = np.random.default_rng(0)  # A fixed sample: the train file is grouped by source.
        rows = (DATA / "sst2" / "train.tsv").read_text().splitlines()
        picked = [rows[0]] + [rows[1 + i] for i in sorted(rng.permutation(len(rows) - 1)[:n_train])]
        dev = (DATA / "sst2" / "dev.tsv").read_text().splitlines()[: n_eval + 1]
        files = {"train": picked, "validation": dev}
        for split, lines in files.items():
            (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        return {s: str(root / f"{s}.tsv") for s in files}
    if task == "conll2003":
        out = {}
        for split, name, n in (("train", "train.txt", n_train), ("validation", "valid.txt", n_eval)):
            blocks = (DATA / "ner" / "conll2003" / "iob2" / name).read_text().split("\n\n")
            blocks = [b for b in blocks if b.strip() and not b.startswith("-DOCSTART-")][:n]
            (root / name).write_text("\n\n".join(blocks) + "\n")
            out[split] = str(root / name)
        return out
    if task == "squad":
        out = {}
        for split, name, n in (("train", "train-v1.1.reconstructed.json.gz", n_train),
                               ("validation", "dev-v1.1.json.gz", n_eval)):
            with gzip.open(DATA / "squad" / name, "rt", encoding="utf-8") as f:
                data = json.load(f)
            kept, count = [], 0
            for article in data["data"]:  # Whole paragraphs, from articles spread over the file.
                paragraphs = []
                for p in article["paragraphs"][:3]:
                    if count < n:
                        qas = p["qas"][: n - count]
                        paragraphs.append({**p, "qas": qas})
                        count += len(qas)
                if paragraphs:
                    kept.append({**article, "paragraphs": paragraphs})
            (root / f"{split}.json").write_text(json.dumps({"data": kept, "version": "1.1"}))
            out[split] = str(root / f"{split}.json")
        return out
    out = {}
    for split, name, n in (("train", "TRAIN_FILE.TXT", n_train), ("test", "TEST_FILE_FULL.TXT", n_eval)):
        blocks = (DATA / "relation" / name).read_bytes().split(b"\r\n\r\n")
        (root / name).write_bytes(b"\r\n\r\n".join(blocks[:n]) + b"\r\n")
        out[split] = str(root / name)
    return out


def make_config(task: str, files: dict[str, str], minilm: str, seed: int, cache: str):
    import importlib.util

    recipe, variant, n_train, _, epochs, batch, max_length, lr = TASKS[task]
    spec = importlib.util.spec_from_file_location("recipe", REPO / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    c.init_from = minilm
    for split, path in files.items():
        c.data.local_files[split] = path
    c.data.cache_dir = cache
    c.data.global_batch_size = batch
    c.data.max_length = max_length
    c.data.prefetch_buffer_size = 0
    c.data.doc_stride = min(c.data.doc_stride, max_length // 3)  # QA: shorter windows here.
    c.data.on_error = "skip"  # Anything unusable is counted (eval_count_*), for both frameworks.
    c.seed = c.data.seed = seed
    c.learning_rate = lr
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    return c, epochs, n_train


def steps_for(config, epochs: int, tokenizer) -> int:
    """Optimizer steps for `epochs` over the training features (QA: windows, not questions)."""
    from transformer.data import pipeline

    pre = pipeline._preprocessor(config.data, tokenizer)
    records = pipeline._records(config.data, "train", 0, 1, False, pre.task.local_format)
    features = sum(len(pre(r)) for r in records)
    return max(1, epochs * features // config.data.global_batch_size)


def run_jax(config, workdir: pathlib.Path) -> dict:
    import shutil

    from transformer.train import trainer

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    start = time.perf_counter()
    result = trainer.train_and_evaluate(config, workdir)
    m = result["metrics"]
    return {"metrics": {k: v for k, v in m.items() if k.startswith(("eval_", "dp_"))},
            "wall_s": time.perf_counter() - start, "compile_s": m.get("compile_s"),
            "compiled_shapes": m.get("compiled_shapes"), "steps_per_s": m.get("steps_per_s")}


def dynamic_padding(batch: dict) -> dict:
    """The batch cut to its longest example (Hugging Face's DataCollatorWithPadding)."""
    n = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :n] if v.ndim == 2 and k != "entity_positions" else v
            for k, v in batch.items()}


def pad_outputs(out: dict, length: int) -> dict:
    """Per-token outputs of a cut batch back to `length` (never chosen: beyond every example)."""
    def pad(k, v):
        if v.ndim != 2 or k == "logits" or v.shape[1] == length:
            return v
        fill = 0 if k == "predictions" else -1e9
        return np.pad(v, ((0, 0), (0, length - v.shape[1])), constant_values=fill)
    return {k: pad(k, v) for k, v in out.items()}


class RelationModel:
    """BertModel + dropout + a linear layer on the concatenated entity-start states."""

    def __new__(cls, path, num_labels, rates):
        import torch
        import transformers

        class Relation(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = transformers.BertModel.from_pretrained(
                    path, add_pooling_layer=False, **rates)
                d = self.bert.config.hidden_size
                self.dropout = torch.nn.Dropout(self.bert.config.hidden_dropout_prob)
                self.classifier = torch.nn.Linear(2 * d, num_labels)
                torch.nn.init.normal_(self.classifier.weight, std=0.02)
                torch.nn.init.zeros_(self.classifier.bias)

            def forward(self, input_ids, attention_mask, token_type_ids, entity_positions):
                h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
                idx = entity_positions[:, :, None].expand(-1, -1, h.shape[-1])
                x = torch.gather(h, 1, idx).reshape(h.shape[0], -1)
                return self.classifier(self.dropout(x))

        return Relation()


def torch_model(kind: str, path: str, num_labels: int, dropout: float):
    import transformers

    rates = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                 classifier_dropout=dropout)
    if kind == "classification":
        return transformers.BertForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, **rates)
    if kind == "token_classification":
        return transformers.BertForTokenClassification.from_pretrained(
            path, num_labels=num_labels, **rates)
    if kind == "qa":
        return transformers.BertForQuestionAnswering.from_pretrained(path, **rates)
    return RelationModel(path, num_labels, rates)


def torch_forward(model, kind: str, batch: dict, train: bool):
    import torch

    t = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items() if k != "weights"}
    inputs = {k: t[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if kind == "relation":
        logits = model(**inputs, entity_positions=t["entity_positions"])
        loss = torch.nn.functional.cross_entropy(logits, t["labels"]) if train else None
        return loss, {"logits": logits}
    if kind == "qa":
        extra = {"start_positions": t["start_positions"], "end_positions": t["end_positions"]}
        out = model(**inputs, **(extra if train else {}))
        return out.loss, {"start_logits": out.start_logits, "end_logits": out.end_logits}
    out = model(**inputs, labels=t["labels"] if train else None)
    if kind == "token_classification":
        return out.loss, {"predictions": out.logits.argmax(-1)}
    return out.loss, {"logits": out.logits}


def initial_head(config) -> dict[str, np.ndarray]:
    """The task head our trainer starts from for `config` (same seed, same initializer)."""
    import jax
    import optax

    from transformer.models import ModelConfig
    from transformer.train import objectives, trainer
    from transformer.train import state as train_state

    config = trainer.resolve_config(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    build = objectives.get_objective(config.objective).builder(model_config, config)
    init = train_state.make_init_fn(model_config, optax.identity(), config.seed, build)
    params = jax.eval_shape(init).params  # Which leaves; then only the head is computed.
    assert set(params) == {"backbone", "head"}, list(params)
    head = jax.jit(lambda: init().params["head"])()
    return {k: np.asarray(v) for k, v in head.items()}


def set_head(model, kind: str, head: dict[str, np.ndarray]) -> None:
    """Copies our head ([inputs, outputs] kernel and bias) into the PyTorch model's linear head."""
    import torch

    linear = model.qa_outputs if kind == "qa" else model.classifier
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head["kernel"].T.copy()))
        linear.bias.copy_(torch.from_numpy(head["bias"]))


def run_torch(config, minilm_hf: str, steps: int, tokenizer, head=None, dropout=0.1) -> dict:
    import torch
    import transformers

    from transformer.data import pipeline
    from transformer.train import objectives, task_eval

    torch.manual_seed(config.seed)
    task = objectives.task_of(config)
    model = torch_model(task.kind, minilm_hf, task.num_labels, dropout)
    if head is not None:
        set_head(model, task.kind, head)
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    groups = [
        {"params": [p for n, p in model.named_parameters() if not no_decay(n)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
                            eps=config.adam_eps)
    sched = transformers.get_linear_schedule_with_warmup(opt, config.warmup_steps, steps)
    batches = iter(pipeline.create_task_dataset(config.data, "train", tokenizer=tokenizer))
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss, _ = torch_forward(model, task.kind, dynamic_padding(next(batches)), train=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    evaluator = task_eval.TaskEvaluator(config, tokenizer, None, None, None,
                                        split=config.data.eval_split)
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in evaluator.batches:
            out = torch_forward(model, task.kind, dynamic_padding(batch), False)[1]
            outputs.append(pad_outputs({k: v.numpy() for k, v in out.items()},
                                       config.data.max_length))
    merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    metrics = evaluator.score(merged, steps)
    return {"metrics": metrics, "wall_s": time.perf_counter() - start}


HEADLINE = {"sst2": "eval_accuracy", "conll2003": "eval_entity_f1", "squad": "eval_f1",
            "semeval": "eval_macro_f1"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds, each a full run")
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--workdir", default="/tmp/finetune_parity")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply subset sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--same_head_init", type=int, default=1,
                        help="1: PyTorch's head starts from our initial head (seeds then differ "
                        "only in dropout); 0: each framework draws its own")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout of both (0: none)")
    parser.add_argument("--full", action="store_true",
                        help="SST-2 on its whole training set (one epoch) and dev set")
    parser.add_argument("--pack", type=int, default=1,
                        help="1: our batches packed (the recipes' default); 0: padded")
    args = parser.parse_args()
    if args.full:
        TASKS["sst2"] = ("glue", "sst2", 67349, 872, 1, 32, 64, 2e-5)
    import shutil

    import jax
    import torch

    from transformer import convert
    from transformer.data.tokenizer import load_tokenizer
    from transformer.train import objectives
    from transformer.train.config import minilm_dir

    torch.set_num_threads(args.threads)
    root = pathlib.Path(args.workdir)
    cache = root / "compilation_cache"  # Empty at the start: the first seed compiles.
    shutil.rmtree(cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    locations.enable_compilation_cache()
    minilm_hf = minilm_dir()
    minilm = root / "minilm"
    if not (minilm / "model_config.json").exists():
        convert.import_hf(minilm_hf, minilm)
    tokenizer = load_tokenizer(minilm / "tokenizer")
    results = {}
    for task in args.tasks.split(","):
        n_train, n_eval = (int(TASKS[task][i] * args.scale) for i in (2, 3))
        files = write_subsets(task, root / "data" / task, n_train, n_eval)
        runs = {"jax": [], "torch": []}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config, epochs, _ = make_config(task, files, str(minilm), seed, str(root / "cache"))
            config.num_train_steps = steps_for(config, epochs, tokenizer)
            config.warmup_steps = config.num_train_steps // 10
            config.eval_every = config.checkpoint_every = config.num_train_steps
            config.log_every = max(1, config.num_train_steps // 10)
            config.model.dropout_rate = config.model.attention_dropout_rate = args.dropout
            config.finetune.classifier_dropout = args.dropout
            config.data.pack_examples = bool(args.pack)
            head = initial_head(config) if args.same_head_init else None
            runs["jax"].append(run_jax(config, root / "runs" / f"{task}-{seed}"))
            runs["torch"].append(run_torch(config, minilm_hf, config.num_train_steps, tokenizer,
                                           head, args.dropout))
            key = HEADLINE[task]
            print(f"{task} seed {seed}: steps {config.num_train_steps}; "
                  f"jax {key}={runs['jax'][-1]['metrics'][key]:.4f} "
                  f"({runs['jax'][-1]['wall_s']:.0f} s), torch "
                  f"{runs['torch'][-1]['metrics'][key]:.4f} ({runs['torch'][-1]['wall_s']:.0f} s)",
                  flush=True)
        key = HEADLINE[task]

        def mean(rs, k, key=key):
            return float(np.mean([r[k] if k == "wall_s" else r["metrics"][key] for r in rs]))

        results[task] = {
            "metric": key, "train_examples": n_train, "eval_examples": n_eval,
            "steps": config.num_train_steps, "batch": config.data.global_batch_size,
            "max_length": config.data.max_length, "epochs": epochs, "seeds": args.seeds,
            "jax": mean(runs["jax"], key), "torch": mean(runs["torch"], key),
            "jax_wall_s": mean(runs["jax"], "wall_s"), "torch_wall_s": mean(runs["torch"], "wall_s"),
            "speedup": mean(runs["torch"], "wall_s") / mean(runs["jax"], "wall_s"),
            "per_seed": {f: [r["metrics"][key] for r in rs] for f, rs in runs.items()},
            "per_seed_wall_s": {f: [round(r["wall_s"], 1) for r in rs] for f, rs in runs.items()},
            "jax_compile_s": [r["compile_s"] for r in runs["jax"]],
            "jax_compiled_shapes": [r["compiled_shapes"] for r in runs["jax"]],
            "packed": objectives.pack_row_multiple(config, 1) is not None,
        }
    print(json.dumps({"finetune_parity": results}))


if __name__ == "__main__":
    main()
