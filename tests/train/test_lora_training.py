"""LoRA training: only the adapters change and only they hold optimizer state; sharded meshes
equal one device; the frozen base can be stored in bfloat16."""

import jax
import numpy as np
import pytest

from tests.train.test_steps import make_batches, one_device_mesh, setup, tiny_config
from transformer import model_io, sharding
from transformer.models import ModelConfig
from transformer.models import lora as lora_lib
from transformer.train import trainable, trainer

RANK = 4


def lora_config(preset="llama-tiny", **changes):
    c = tiny_config(preset, **changes)
    c.model.update(dict(lora_rank=RANK, lora_alpha=8.0, lora_targets=("all-linear",)))
    if preset == "llama-tiny":
        c.model.num_kv_heads = 2
    return c


def train(config, mesh, batches):
    state, step, batch_sharding, rules = setup(config, mesh)
    initial = jax.tree.map(np.asarray, state.params)
    losses = []
    with sharding.use_mesh(mesh, rules):
        for batch in batches:
            state, metrics = step(state, trainer.to_global(batch, batch_sharding))
            losses.append(float(metrics["loss"]))
    return initial, state, losses


def flat(tree):
    return {k: np.asarray(v) for k, v in model_io.flat_params(tree).items()}


@pytest.fixture(scope="module")
def reference_run():
    return train(lora_config(), one_device_mesh(), make_batches(1) * 4)


def test_only_adapters_train_and_hold_optimizer_state(reference_run):
    initial, state, losses = reference_run
    before, after = flat(initial), flat(state.params)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    adapters = {k for k in before if lora_lib.is_adapter_path(k.split("."))}
    assert adapters and changed == adapters, sorted(changed ^ adapters)
    assert losses[-1] < losses[0]
    # AdamW's two moments, each exactly the adapters' shapes, and nothing for the base.
    moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    assert len(moments) == 1
    for moment in (moments[0].mu, moments[0].nu):
        assert {k: v.shape for k, v in flat(moment).items()} == {k: before[k].shape for k in adapters}
    config = ModelConfig.from_dict(lora_config().model.to_dict())
    n_train, n_total = trainable.count(state.params, trainable.predicate(lora_config()))
    # Per layer: r·(in + out) for every adapted weight.
    d, f, h, k, hd = (config.hidden_size, config.mlp_dim, config.num_heads, config.kv_heads,
                      config.dim_per_head)
    per_layer = RANK * ((d + h * hd) * 2 + (d + k * hd) * 2 + 3 * (d + f))
    assert n_train == config.num_layers * per_layer
    assert n_train < n_total


@pytest.mark.parametrize("shape, remat", [((8, 1, 1), "none"), ((1, 8, 1), "none"),
                                          ((2, 2, 2), "full"), ((1, 4, 2), "none")])
def test_sharded_lora_training_equals_one_device(reference_run, shape, remat):
    _, ref_state, ref_losses = reference_run
    config = lora_config()
    config.model.remat_policy = remat  # Recomputing the layer gives the same gradients.
    _, state, losses = train(config, sharding.make_mesh(shape), make_batches(1) * 4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    ours, ref = flat(state.params), flat(ref_state.params)
    for key in ours:
        np.testing.assert_allclose(ours[key], ref[key], atol=2e-6, err_msg=key)
    if shape == (1, 4, 2):  # The adapters are really sharded as the weights they adapt.
        b = state.params["layers"]["blocks"]["mlp"]["wi_lora"]["b"]
        assert b.sharding.shard_shape(b.shape) != b.shape


def test_frozen_base_in_bfloat16_trains_the_same_adapters():
    config = lora_config()
    config.finetune.frozen_dtype = "bfloat16"
    _, state, losses = train(config, one_device_mesh(), make_batches(1) * 3)
    dtypes = {k: v.dtype for k, v in flat(state.params).items()}
    assert {str(d) for k, d in dtypes.items() if lora_lib.is_adapter_path(k.split("."))} == {"float32"}
    assert {str(d) for k, d in dtypes.items()
            if not lora_lib.is_adapter_path(k.split("."))} == {"bfloat16"}
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_a_run_with_nothing_to_train_is_refused():
    config = lora_config()
    config.model.lora_rank = 0
    assert trainable.predicate(config) is None  # No LoRA: everything trains.
    config.model.lora_rank = RANK
    params = {"layers": {"w": np.zeros(3)}}
    with pytest.raises(ValueError, match="no parameter is trainable"):
        trainable.check(params, trainable.predicate(config))
