"""Pretraining: causal or masked language modeling (`data.objective`) on packed rows.

  lm    the next-token (causal) or masked-token loss; MoE router losses added when the model has
        experts; evaluation is loss, perplexity and accuracy over the whole eval split. With
        `dp.enabled` (causal fine-tuning), one document a row, Poisson-sampled
        (transformer/data/dp_records.py)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from transformer.data import dp_records, pipeline
from transformer.data.tokenizer import Tokenizer
from transformer.models import MODELS, ModelConfig, moe
from transformer.train import flops
from transformer.train import step as step_lib
from transformer.train.distributed import any_process_has, to_global
from transformer.train.losses import cross_entropy
from transformer.train.objectives.registry import (
    BEST_METRIC,
    Builder,
    Objective,
    get_objective,
    mean_of,
    register,
)


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
    if config.dp.enabled:  # DP-SGD: a document a row, Poisson-sampled.
        records = dp_records.documents(config.data, config.data.train_split, tokenizer)
        return iter(dp_records.private_batches(records, config.data, _dp_rate(config),
                                               process_index, process_count))
    return iter(pipeline.create_pretraining_dataset(
        config.data, config.data.train_split, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count))


def _dp_rate(config: ml_collections.ConfigDict) -> float:
    return config.dp.expected_batch_size / config.dp.dataset_size


def _lm_dataset_size(config, _tokenizer):
    return dp_records.count_documents(config.data, config.data.train_split)


def _lm_evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, **_):
    eval_step = step_lib.make_eval_step(graphdef, config, params_sharding, batch_sharding,
                                        objective=get_objective(config.objective))
    return lambda params, step: evaluate(config, eval_step, params, tokenizer, batch_sharding)


def _lm_head_flops(model_config, config, seq_len):
    return flops.lm_head_flops(model_config)


register(Objective("lm", ("batch", "length"), _lm_builder, _lm_loss, _lm_summary, _lm_data,
                   _lm_evaluator, _lm_head_flops, dataset_size=_lm_dataset_size))

BEST_METRIC["lm"] = "eval_loss"


def evaluate(
    config: ml_collections.ConfigDict,
    eval_step: Any,
    params: Any,
    tokenizer: Tokenizer,
    batch_sharding: NamedSharding,
    dataset: Any = None,
) -> dict[str, float]:
    """Loss, perplexity and accuracy over the whole eval split (or `eval_steps` batches); the
    last batch is padded with weight-0 rows, so every token counts exactly once. `dataset` gives
    the batches (default: the pretraining pipeline's eval split)."""
    if dataset is None:
        dataset = pipeline.create_pretraining_dataset(
            config.data, config.data.eval_split, tokenizer=tokenizer, train=False,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
    batches = iter(dataset)
    totals, count, template = None, 0, None
    while config.eval_steps is None or count < config.eval_steps:
        batch = next(batches, None)
        template = template if batch is None else batch
        if not any_process_has(batch is not None) or template is None:
            break
        if batch is None:  # This process is done but others are not: feed a weight-0 batch.
            batch = {k: np.zeros_like(v) for k, v in template.items()}
        sums = eval_step(params, to_global(batch, batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        count += 1
    if totals is None:
        raise ValueError(f"the eval split {config.data.eval_split!r} produced no batches")
    weight = max(float(totals["weight_sum"]), 1.0)
    nll = float(totals["nll_sum"]) / weight
    return {
        "eval_loss": float(totals["loss_sum"]) / weight,
        "eval_perplexity": float(np.exp(min(nll, 80.0))),
        "eval_accuracy": float(totals["correct_sum"]) / weight,
        "eval_tokens": float(totals["weight_sum"]),
    }
