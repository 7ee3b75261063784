"""Encoder-decoder objectives (transformer/models/encoder_decoder.py: T5, BART).

  seq2seq          teacher forcing on (source, target) pairs (transformer/data/seq2seq.py): the
                   cross-entropy of every real target token, averaged over them; evaluation
                   generates each example of the split once and scores BLEU/chrF or ROUGE
  span_corruption  T5 pretraining (transformer/data/span_corruption.py): the same loss on
                   span-corrupted text; evaluation is the loss over the whole eval split
"""

from __future__ import annotations

import jax
import ml_collections

from transformer.data import seq2seq as seq2seq_data
from transformer.data import span_corruption
from transformer.models import MODELS, ModelConfig
from transformer.train import flops
from transformer.train import step as step_lib
from transformer.train.losses import cross_entropy
from transformer.train.objectives.lm import _lm_summary, evaluate
from transformer.train.objectives.registry import (
    BEST_METRIC,
    Builder,
    Objective,
    get_objective,
    register,
)


def _builder(model_config: ModelConfig, config: ml_collections.ConfigDict) -> Builder:
    if model_config.architecture != "encoder_decoder":
        raise ValueError(f"objective {config.objective!r} trains an encoder-decoder; the model is "
                         f"an {model_config.architecture} (use a T5 or BART preset, e.g. "
                         "--config.model=t5-small in the recipe, or init_from a T5/BART import)")
    return lambda rngs: MODELS["encoder_decoder"](model_config, rngs=rngs)


def forward(model, batch: dict[str, jax.Array], dropout_rng: jax.Array | None = None):
    """The model under teacher forcing on a packed seq2seq batch."""
    return model(batch["inputs"], batch["decoder_inputs"], segment_ids=batch["segment_ids"],
                 decoder_segment_ids=batch["decoder_segment_ids"],
                 positions=batch["positions"], decoder_positions=batch["decoder_positions"],
                 dropout_rng=dropout_rng)


def _loss(model, batch, dropout_rng, config):
    """Sums over the real target tokens (weights 0 on padding): the step divides by their
    count, so the loss is the mean over target tokens, whatever the packing."""
    out = forward(model, batch, dropout_rng)
    return cross_entropy(out.logits, batch["targets"], batch["weights"],
                         label_smoothing=config.label_smoothing, z_loss=config.z_loss)


def _seq2seq_data(config, tokenizer, process_index, process_count):
    return iter(seq2seq_data.create_seq2seq_dataset(
        config, config.data.train_split, tokenizer=tokenizer, process_index=process_index,
        process_count=process_count))


def _seq2seq_evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, *,
                       workdir=None, split=None, out_dir=None):
    from transformer.train import seq2seq_eval

    return seq2seq_eval.GenerationEvaluator(
        config, tokenizer, graphdef, params_sharding, batch_sharding,
        split=split or config.data.eval_split, workdir=workdir, out_dir=out_dir)


def _span_data(config, tokenizer, process_index, process_count):
    return iter(span_corruption.create_span_corruption_dataset(
        config, config.data.train_split, tokenizer=tokenizer, process_index=process_index,
        process_count=process_count))


def _span_evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding, **_):
    eval_step = step_lib.make_eval_step(graphdef, config, params_sharding, batch_sharding,
                                        objective=get_objective(config.objective))

    def run(params, step):
        batches = span_corruption.create_span_corruption_dataset(
            config, config.data.eval_split, tokenizer=tokenizer, train=False,
            process_index=jax.process_index(), process_count=jax.process_count())
        return evaluate(config, eval_step, params, tokenizer, batch_sharding, batches)

    return run


def _head_flops(model_config, config, seq_len):
    return flops.lm_head_flops(model_config)


register(Objective("seq2seq", ("batch", "length"), _builder, _loss, _lm_summary, _seq2seq_data,
                   _seq2seq_evaluator, _head_flops))
register(Objective("span_corruption", ("batch", "length"), _builder, _loss, _lm_summary,
                   _span_data, _span_evaluator, _head_flops))
BEST_METRIC.update({"seq2seq": "eval_bleu", "span_corruption": "eval_loss"})
