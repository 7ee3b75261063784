"""Fine-tuning tasks on a pretrained backbone with a task head (transformer/models/heads.py).

  classification        sequence (pair) classification: pooled features → labels
  token_classification  a label per token (NER), later subwords and padding ignored (-100)
  qa                    extractive QA: start/end logits, SQuAD windows
  relation              relation classification from the two entity-start markers
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from transformer import sharding
from transformer.data import pipeline, poisson, task_packing, tasks
from transformer.models import ModelConfig
from transformer.models.heads import HeadConfig, Placement, TaskModel
from transformer.train import flops
from transformer.train.losses import cross_entropy
from transformer.train.objectives.registry import (
    BEST_METRIC,
    Batch,
    Builder,
    Objective,
    mean_of,
    register,
)


def task_of(config: ml_collections.ConfigDict) -> tasks.Task:
    """The task named by `data.task`, defining it first when `finetune.labels`/`text_keys`
    describe a custom one (any CSV/TSV/JSONL or CoNLL label set)."""
    from transformer.train import custom_task

    return custom_task.resolve(config)


def head_config(config: ml_collections.ConfigDict) -> HeadConfig:
    task = task_of(config)
    rate = config.finetune.classifier_dropout
    return HeadConfig(task.kind, max(task.num_labels, 1), config.finetune.pooling,
                      None if rate is None or rate < 0 else rate)


def _task_builder(model_config: ModelConfig, config: ml_collections.ConfigDict) -> Builder:
    head = head_config(config)
    if head.kind != config.objective:
        raise ValueError(f"config.objective={config.objective!r} but task {config.data.task!r} "
                         f"is a {head.kind!r} task; set --config.objective={head.kind}")
    return lambda rngs: TaskModel(model_config, head, rngs=rngs)


def placement(batch: Batch) -> Placement:
    """Where the examples of a packed batch lie."""
    return Placement(batch["example_rows"], batch["example_starts"], batch["example_lengths"],
                     batch["segment_ids"])


def forward(model: TaskModel, batch: Batch, dropout_rng: jax.Array | None = None) -> dict:
    """The task model on a padded or a packed batch (`transformer.data.task_packing`)."""
    if not task_packing.is_packed(batch):
        return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                     entity_positions=batch.get("entity_positions"), dropout_rng=dropout_rng)
    return model(batch["input_ids"], batch["segment_ids"], batch.get("token_type_ids"),
                 entity_positions=batch.get("entity_positions"), dropout_rng=dropout_rng,
                 positions=batch["positions"], placement=placement(batch))


def _task_loss(model, batch, dropout_rng, config):
    out = forward(model, batch, dropout_rng)
    weights = batch["weights"].astype(jnp.float32)
    if "start_logits" in out:  # QA: the mean of the start and end cross-entropies (as BERT).
        start = cross_entropy(out["start_logits"], batch["start_positions"], weights)
        end = cross_entropy(out["end_logits"], batch["end_positions"], weights)
        return {"loss_sum": (start["loss_sum"] + end["loss_sum"]) / 2,
                "correct_sum": (start["correct_sum"] + end["correct_sum"]) / 2,
                "weight_sum": weights.sum()}
    labels = batch["labels"]
    if labels.ndim == 2:  # Tokens: only labelled positions of real examples are scored.
        real = 1.0 if task_packing.is_packed(batch) else weights[:, None]  # Packed: no padding rows.
        weights = real * (labels != tasks.IGNORE)
    labels = jnp.where(labels == tasks.IGNORE, 0, labels)
    sums = cross_entropy(out["logits"], labels, weights,
                         label_smoothing=config.label_smoothing)
    return {k: sums[k] for k in ("loss_sum", "correct_sum", "weight_sum")}


def _task_summary(sums):
    return {"loss": mean_of(sums, "loss_sum"), "accuracy": mean_of(sums, "correct_sum"),
            "examples": sums["weight_sum"]}


def pack_row_multiple(config: ml_collections.ConfigDict, process_count: int) -> int | None:
    """Rows of a packed task batch grow in steps of this; None = batches are not packed.

    Packing needs one process (each would pack its rows differently, and global arrays need one
    shape everywhere) and no gradient accumulation (microbatches split rows, not examples)."""
    if not config.data.pack_examples or task_of(config).kind not in task_packing.PACKABLE_KINDS:
        return None
    if process_count > 1 or config.grad_accum_steps > 1:
        logging.info("examples are not packed: packing needs one process and grad_accum_steps=1")
        return None
    return config.data.pack_row_multiple or task_packing.default_row_multiple(
        config.data.global_batch_size, sharding.data_parallel_size(config.mesh.to_dict()))


def _task_data(config, tokenizer, process_index, process_count):
    from transformer.train import task_eval

    task = task_of(config)
    task_eval.log_build_report(config.data, config.data.train_split, task.local_format)
    if config.dp.enabled:  # DP-SGD: Poisson-sampled, padded batches (transformer/data/poisson.py).
        rate = config.dp.expected_batch_size / config.dp.dataset_size
        return iter(poisson.create_poisson_dataset(
            config.data, config.data.train_split, rate, tokenizer=tokenizer,
            process_index=process_index, process_count=process_count,
            windows=config.dp.windows_per_example))
    return iter(pipeline.create_task_dataset(
        config.data, config.data.train_split, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count,
        pack_row_multiple=pack_row_multiple(config, process_count)))


def _task_dataset_size(config, tokenizer):
    return poisson.count_examples(config.data, config.data.train_split, task_of(config).local_format)


def _task_evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, *,
                    workdir=None, split=None, out_dir=None):
    from transformer.train import task_eval

    return task_eval.TaskEvaluator(config, tokenizer, graphdef, params_sharding, batch_sharding,
                                   split=split or config.data.eval_split, workdir=workdir,
                                   out_dir=out_dir)


def _task_head_flops(model_config, config, seq_len):
    return flops.task_head_flops(model_config, head_config(config), seq_len)


for _kind in ("classification", "token_classification", "qa", "relation"):
    register(Objective(_kind, ("batch",), _task_builder, _task_loss, _task_summary, _task_data,
                       _task_evaluator, _task_head_flops, dataset_size=_task_dataset_size))

# The metric that selects the best checkpoint, by task kind (the key the evaluator reports).
BEST_METRIC.update({"classification": "eval_accuracy", "token_classification": "eval_entity_f1",
                    "qa": "eval_f1", "relation": "eval_macro_f1"})


def best_metric(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(metric key, 'max' or 'min'): `finetune.best_metric` or the task's own metric."""
    name = config.finetune.best_metric or BEST_METRIC[config.objective]
    if name == "eval_accuracy" and config.data.task and task_of(config).metric == "matthews_corr":
        name = "eval_matthews_corr"
    mode = config.finetune.best_mode or ("min" if name.endswith(("loss", "perplexity")) else "max")
    if mode not in ("max", "min"):
        raise ValueError(f"finetune.best_mode must be 'max' or 'min', got {mode!r}")
    logging.debug("best checkpoint by %s (%s)", name, mode)
    return name, mode
