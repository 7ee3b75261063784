"""Training objectives by name (`config.objective`): what the one training loop needs to know
about a task, so that the loop itself knows none.

An objective gives the model to build, the batches to train on, the loss (as sums over the
batch, so microbatches and devices combine exactly), the train metrics, an evaluator, and the
FLOPs of the output it computes on top of the layer stack (for MFU).

  lm                    pretraining: causal or masked LM (`data.objective`), packed rows
  classification        sequence (pair) classification: pooled features → labels
  token_classification  a label per token (NER), later subwords and padding ignored (-100)
  qa                    extractive QA: start/end logits, SQuAD windows
  relation              relation classification from the two entity-start markers
  distill_*             knowledge distillation from a frozen teacher (transformer/train/distill.py)
  sft                   supervised fine-tuning on chat conversations (transformer/train/sft.py)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from transformer import sharding
from transformer.data import pipeline, poisson, task_packing, tasks
from transformer.models import MODELS, ModelConfig, moe
from transformer.models.heads import HeadConfig, Placement, TaskModel
from transformer.train import flops
from transformer.train.losses import cross_entropy

Batch = dict[str, jax.Array]
Builder = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    batch_axes: tuple[str, ...]  # Logical axes of the leading dims of every batch array.
    builder: Callable[[ModelConfig, ml_collections.ConfigDict], Builder]
    loss: Callable[[nnx.Module, Batch, jax.Array | None, ml_collections.ConfigDict], dict]
    summarize: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]  # sums → train metrics
    train_data: Callable[..., Iterator[dict[str, Any]]]  # (config, tokenizer) → batches
    evaluator: Callable[..., Callable[[Any, int], dict[str, float]]]  # see `make_evaluator`
    # Forward FLOPs per token of what the model computes on top of its layer stack, for MFU:
    # (model config, config, sequence length) → FLOPs (see transformer/train/flops.py).
    head_flops: Callable[[ModelConfig, ml_collections.ConfigDict, int], float]
    # Objectives that read a second, frozen model (distillation, transformer/train/distill.py):
    # config → config after `init_from` (e.g. the student's architecture from the teacher's), and
    # (config, mesh, rules) → the frozen model (`graphdef`, `params`, `shardings`,
    # `init_student(params, params_sharding)`); its model reaches `loss` as `teacher=`.
    resolve: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None
    teacher: Callable[..., Any] | None = None


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown config.objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def mean_of(sums: dict[str, jax.Array], key: str) -> jax.Array:
    return sums[key] / jnp.maximum(sums["weight_sum"], 1.0)


# --- Pretraining: causal or masked language modeling. ----------------------------------------


def _lm_builder(model_config: ModelConfig, config: ml_collections.ConfigDict) -> Builder:
    return lambda rngs: MODELS[model_config.architecture](model_config, rngs=rngs)


def _lm_loss(model, batch, dropout_rng, config):
    out = model(batch["inputs"], token_type_ids=batch.get("token_type_ids"),
                segment_ids=batch["segment_ids"], positions=batch["positions"],
                dropout_rng=dropout_rng)
    sums = cross_entropy(out.logits, batch["targets"], batch["weights"],
                         label_smoothing=config.label_smoothing, z_loss=config.z_loss)
    if out.router_stats is not None:
        sums.update(_moe_sums(model.config, out.router_stats, sums))
    return sums


def _moe_sums(model_config: ModelConfig, stats: dict, sums: dict) -> dict:
    """Router losses, weighted by the model config, added to the loss sum. They are batch means,
    so they enter as mean × weight_sum: dividing by weight_sum gives loss + w · aux (with
    microbatches, the token-weighted mean of each microbatch's aux loss)."""
    balance, z = moe.load_balancing_loss(stats), moe.router_z_loss(stats)
    total = sums["weight_sum"]
    extra = (model_config.router_aux_loss_weight * balance
             + model_config.router_z_loss_weight * z) * total
    return {"loss_sum": sums["loss_sum"] + extra, "router_aux_loss_sum": balance * total,
            "router_z_loss_sum": z * total, "moe_dropped_sum": moe.dropped_fraction(stats) * total,
            "expert_tokens": jnp.sum(stats["expert_tokens"], axis=0)}


def _lm_summary(sums):
    metrics = {"loss": mean_of(sums, "loss_sum"), "nll": mean_of(sums, "nll_sum"),
               "accuracy": mean_of(sums, "correct_sum"), "tokens": sums["weight_sum"]}
    if "expert_tokens" in sums:  # Per-expert load: its share of the top-k assignments × E.
        load = sums["expert_tokens"] / jnp.maximum(jnp.sum(sums["expert_tokens"]), 1.0)
        load = load * load.shape[0]
        metrics.update({"router_aux_loss": mean_of(sums, "router_aux_loss_sum"),
                        "router_z_loss": mean_of(sums, "router_z_loss_sum"),
                        "moe_dropped_fraction": mean_of(sums, "moe_dropped_sum"),
                        "expert_load_max": jnp.max(load), "expert_load_min": jnp.min(load),
                        **{f"expert_load/{e}": load[e] for e in range(load.shape[0])}})
    return metrics


def _lm_data(config, tokenizer, process_index, process_count):
    return iter(pipeline.create_pretraining_dataset(
        config.data, config.data.train_split, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count))


def _lm_evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, **_):
    from transformer.train import step as step_lib
    from transformer.train import trainer

    eval_step = step_lib.make_eval_step(graphdef, config, params_sharding, batch_sharding)
    return lambda params, step: trainer.evaluate(config, eval_step, params, tokenizer,
                                                 batch_sharding)


def _lm_head_flops(model_config, config, seq_len):
    return flops.lm_head_flops(model_config)


register(Objective("lm", ("batch", "length"), _lm_builder, _lm_loss, _lm_summary, _lm_data,
                   _lm_evaluator, _lm_head_flops))


# --- Fine-tuning tasks. ------------------------------------------------------------------------


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
            process_index=process_index, process_count=process_count))
    return iter(pipeline.create_task_dataset(
        config.data, config.data.train_split, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count,
        pack_row_multiple=pack_row_multiple(config, process_count)))


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
                       _task_evaluator, _task_head_flops))

# The metric that selects the best checkpoint, by task kind (the key the evaluator reports).
BEST_METRIC = {"classification": "eval_accuracy", "token_classification": "eval_entity_f1",
               "qa": "eval_f1", "relation": "eval_macro_f1", "lm": "eval_loss", "sft": "eval_loss"}


# Objectives in their own modules register themselves: distill_* and sft.
from transformer.train import distill, sft  # noqa: E402, F401


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
