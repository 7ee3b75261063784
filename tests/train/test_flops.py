"""Model FLOPs per token (for MFU) against XLA's own count of the compiled train step.

For each objective, the train step is built as the trainer builds it (the objective's model, the
optimizer, the shardings, `step.make_train_step`), compiled for abstract inputs (nothing is
allocated, so the model can be wide enough for matmuls to dominate), and
`compiled.cost_analysis()['flops']` is compared with `flops_per_token × tokens`. XLA counts a
multiply-add as 2 FLOPs, like the formula, and counts the elementwise work too (norms,
activations, softmax, loss, optimizer) that MFU leaves out: at width 384 that is 1-3% more, so the
two must agree within TOLERANCE. An LM head counted where a step runs none would be ~20% here.

Two settings make XLA's count comparable: the layers are unrolled (`scan_layers=False`; the cost
analysis counts a loop body once, not once per layer), and there is no rematerialization or
dropout (MFU counts neither).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from transformer import sharding
from transformer.models import ModelConfig, get_preset
from transformer.models.heads import HeadConfig
from transformer.train import flops, layer_decay, objectives, optimizer
from transformer.train import state as train_state
from transformer.train import step as step_lib
from transformer.train.config import base_config, finetune_config

B, T = 8, 128
TOLERANCE = 0.04
WIDTH = dict(vocab_size=4096, hidden_size=384, num_layers=2, num_heads=6, mlp_dim=1536,
             max_length=T, dropout_rate=0.0, attention_dropout_rate=0.0, scan_layers=False,
             remat_policy="none")

# name: (preset, config.objective, data.task, model changes)
CASES = {
    "causal_lm": ("gpt2-tiny", "lm", None, {}),
    "causal_lm_llama": ("llama-tiny", "lm", None, dict(num_kv_heads=2, mlp_dim=1024)),
    "masked_lm": ("bert-tiny", "lm", None, {}),
    "classification": ("bert-tiny", "classification", "sst2", {}),
    "token_classification": ("bert-tiny", "token_classification", "conll2003", {}),
    "qa": ("bert-tiny", "qa", "squad", {}),
    "relation": ("bert-tiny", "relation", "semeval2010_task8", {}),
}


def config_for(name):
    preset, objective, task, changes = CASES[name]
    if objective == "lm":
        c = base_config(preset)
        c.data.objective = "mlm" if preset.startswith("bert") else "causal"
    else:
        c = finetune_config(objective, task, preset)
    c.model.update({**WIDTH, **changes})
    c.data.max_length = T
    c.data.global_batch_size = B
    return c


def abstract_batch(objective, batch_sharding):
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding)
    if objective == "lm":
        return dict(inputs=i32(B, T), targets=i32(B, T), weights=f32(B, T),
                    segment_ids=i32(B, T), positions=i32(B, T))
    batch = dict(input_ids=i32(B, T), attention_mask=i32(B, T), token_type_ids=i32(B, T),
                 weights=f32(B))
    if objective in ("classification", "relation"):
        batch["labels"] = i32(B)
    if objective == "relation":
        batch["entity_positions"] = i32(B, 2)
    if objective == "token_classification":
        batch["labels"] = i32(B, T)
    if objective == "qa":
        batch["start_positions"], batch["end_positions"] = i32(B), i32(B)
    return batch


def xla_and_formula_flops(config):
    """(XLA's FLOPs of the compiled train step, the trainer's FLOPs per step)."""
    objective = objectives.get_objective(config.objective)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    rules = [tuple(r) for r in config.logical_axis_rules]
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    build = objective.builder(model_config, config)
    tx, schedule = optimizer.make_optimizer(config)
    tx = layer_decay.with_layer_decay(tx, config.finetune.layer_decay, model_config.num_layers)
    shapes = jax.eval_shape(train_state.make_init_fn(model_config, tx, config.seed, build))
    params_sharding = train_state.param_shardings(model_config, mesh, rules, build)
    shardings = train_state.state_shardings(shapes, params_sharding, mesh)
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        objective.batch_axes, rules, (B, T), mesh))
    train_step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings,
                                          batch_sharding)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, shardings)
    with sharding.use_mesh(mesh, rules):
        compiled = train_step.lower(state, abstract_batch(config.objective, batch_sharding)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list in older versions.
    head = objective.head_flops(model_config, config, T)
    return cost["flops"], flops.flops_per_token(model_config, T, head) * B * T


@pytest.mark.parametrize("name", list(CASES))
def test_flops_per_token_matches_xla_cost_analysis(name):
    xla, formula = xla_and_formula_flops(config_for(name))
    ratio = xla / formula
    print(f"{name}: XLA {xla:.4g} FLOPs, formula {formula:.4g}, ratio {ratio:.4f}")
    assert abs(ratio - 1) < TOLERANCE, f"{name}: XLA/formula = {ratio:.4f}"


def test_task_models_count_no_lm_head():
    """A fine-tuned classifier never runs the output layer over the vocabulary: its FLOPs do not
    depend on the vocabulary size (all-MiniLM-L6-v2 has 30,522 tokens)."""
    minilm = get_preset("bert-base", hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536)
    small_vocab = minilm.replace(vocab_size=1000)
    for kind in ("classification", "token_classification", "qa", "relation"):
        head = HeadConfig(kind, num_labels=3)
        counts = [flops.flops_per_token(m, T, flops.task_head_flops(m, head, T))
                  for m in (minilm, small_vocab)]
        assert counts[0] == counts[1], kind
    lm = flops.flops_per_token(minilm, T)
    classifier = flops.flops_per_token(
        minilm, T, flops.task_head_flops(minilm, HeadConfig("classification", 2), T))
    assert lm - classifier > 6 * 384 * 30522  # The vocabulary layer, forward and backward.


def test_sequence_heads_are_counted_once_per_sequence():
    """Per-sequence heads (pooler, classifier, relation) run once a sequence, per-token heads
    (NER, QA) at every position."""
    config = get_preset("bert-tiny")
    d = config.hidden_size
    assert flops.task_head_flops(config, HeadConfig("classification", 5), T) == \
        (2 * d * d + 2 * d * 5) / T
    assert flops.task_head_flops(config, HeadConfig("classification", 5, "cls"), T) == 2 * d * 5 / T
    assert flops.task_head_flops(config, HeadConfig("relation", 5), T) == 2 * 2 * d * 5 / T
    assert flops.task_head_flops(config, HeadConfig("token_classification", 5), T) == 2 * d * 5
    assert flops.task_head_flops(config, HeadConfig("qa"), T) == 2 * d * 2
