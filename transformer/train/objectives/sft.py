"""Supervised fine-tuning (`objective='sft'`): a decoder learns the assistant turns of chat
conversations rendered with its tokenizer's chat template (transformer/data/sft.py).

The loss is the causal LM loss of pretraining, on packed rows of whole conversations whose weights
cover only the assistant's tokens (transformer/data/sft_batches.py). Combined with LoRA
(`model.lora_rank`), only the adapters train. With `dp.enabled`, one conversation a row, never
packed, Poisson-sampled (transformer/data/dp_records.py).
"""

from __future__ import annotations

import jax
import ml_collections

from transformer.data import dp_records, sft_batches
from transformer.models import ModelConfig
from transformer.train import flops
from transformer.train import step as step_lib
from transformer.train.objectives.lm import _dp_rate, _lm_builder, _lm_loss, _lm_summary
from transformer.train.objectives.lm import evaluate as evaluate_lm
from transformer.train.objectives.registry import BEST_METRIC, Objective, get_objective, register


def _builder(model_config: ModelConfig, config: ml_collections.ConfigDict):
    if model_config.architecture != "decoder":
        raise ValueError("objective 'sft' trains a decoder to continue conversations; the model is "
                         f"an {model_config.architecture} (use a GPT-2, Llama or Mistral model)")
    return _lm_builder(model_config, config)


def _data(config, tokenizer, process_index, process_count):
    if config.dp.enabled:  # DP-SGD: a conversation a row, Poisson-sampled.
        records = dp_records.conversations(config.data, config.data.train_split, tokenizer)
        return iter(dp_records.private_batches(records, config.data, _dp_rate(config),
                                               process_index, process_count))
    return sft_batches.create_sft_dataset(
        config.data, config.data.train_split, tokenizer=tokenizer,
        process_index=process_index, process_count=process_count)


def _evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, **_):
    eval_step = step_lib.make_eval_step(graphdef, config, params_sharding, batch_sharding,
                                        objective=get_objective(config.objective))

    def evaluate(params, step):
        batches = sft_batches.create_sft_dataset(
            config.data, config.data.eval_split, tokenizer=tokenizer, train=False,
            process_index=jax.process_index(), process_count=jax.process_count())
        return evaluate_lm(config, eval_step, params, tokenizer, batch_sharding, batches)

    return evaluate


def _dataset_size(config, tokenizer):
    return dp_records.count_conversations(config.data, config.data.train_split, tokenizer())


register(Objective("sft", ("batch", "length"), _builder, _lm_loss, _lm_summary, _data, _evaluator,
                   lambda model_config, config, seq_len: flops.lm_head_flops(model_config),
                   dataset_size=_dataset_size))
BEST_METRIC["sft"] = "eval_loss"
