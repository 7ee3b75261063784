"""Context parallelism (the sequence split over a 'context' mesh axis): ring and all-gather
attention, with and without causal load balancing, equal the unsplit model on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.test_steps import make_batches, one_device_mesh, setup, tiny_config
from transformer import sharding
from transformer.models import build_model, context_parallel, get_preset
from transformer.train import step as step_lib
from transformer.train import trainer

B, T, V = 4, 32, 128
TINY = dict(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
            max_length=T, attention_impl="einsum", dropout_rate=0.0, attention_dropout_rate=0.0)

# Tiny programs: LLVM's optimizations would cost more than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def llama(**changes):
    return get_preset("llama-tiny", **{**TINY, **changes})


def lm_config(model_config):
    c = tiny_config("llama-tiny")
    c.model.update(model_config.to_dict())
    c.data.max_length = T
    return c


@pytest.fixture(scope="module")
def batch():
    """Packed causal-LM rows: three documents in row 0, padding at the end of row 1."""
    rng = np.random.default_rng(0)
    segments = np.ones((B, T), np.int32)
    segments[0, 9:20], segments[0, 20:] = 2, 3
    segments[1, 27:] = 0
    segments[2, 5:] = 2
    positions = np.zeros((B, T), np.int32)
    for t in range(1, T):
        same = segments[:, t] == segments[:, t - 1]
        positions[:, t] = np.where(same, positions[:, t - 1] + 1, 0)
    inputs = rng.integers(1, V, (B, T)).astype(np.int32)
    weights = ((segments == np.roll(segments, -1, 1)) & (segments > 0)).astype(np.float32)
    weights[:, -1] = 0
    return dict(inputs=inputs, targets=np.roll(inputs, -1, 1), weights=weights,
                segment_ids=segments, positions=positions)


@pytest.fixture(scope="module")
def params():
    """One set of parameters for every case (strategy and window do not change them)."""
    init = jax.jit(lambda: nnx.split(build_model(llama(), seed=0))[1])
    return init.lower().compile(FAST_COMPILE)()  # One program, not an op-by-op init.


def loss_logits_and_grads(model_config, mesh, batch, params):
    """The train step's loss function (which lays the batch out zig-zag when load balancing),
    its gradients, and the logits back in the original order."""
    config = lm_config(model_config)
    rules = [tuple(r) for r in config.logical_axis_rules]
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_config, seed=0)))
    params = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
    loss_fn = step_lib.make_loss_fn(graphdef, config)

    def run(params, batch):
        (loss_sum, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        laid_out = context_parallel.prepare_batch(batch, causal=True,
                                                  load_balance=model_config.context_load_balance)
        logits = nnx.merge(graphdef, params)(
            laid_out["inputs"], segment_ids=laid_out["segment_ids"],
            positions=laid_out["positions"]).logits
        return loss_sum / sums["weight_sum"], logits, grads

    with sharding.use_mesh(mesh, rules):
        batch = jax.tree.map(jnp.asarray, batch)
        compiled = jax.jit(run).lower(params, batch).compile(FAST_COMPILE)
        loss, logits, grads = compiled(params, batch)
    if model_config.context_load_balance and sharding.CONTEXT_AXIS in mesh.shape:
        logits = np.asarray(logits)[:, np.argsort(context_parallel.load_balance_order(
            T, mesh.shape[sharding.CONTEXT_AXIS]))]
    return float(loss), np.asarray(logits), grads


@pytest.fixture(scope="module")
def references(batch, params):
    """One device, no context axis: the unsplit computation, with and without a window."""
    return {window: loss_logits_and_grads(llama(sliding_window=window), one_device_mesh(), batch,
                                          params)
            for window in (None, 6)}


CASES = {  # name: (mesh, model changes); each strategy with and without load balancing.
    "ring-balanced-context8-window-remat-unrolled": (
        dict(fsdp=1, context=8),
        dict(context_parallel="ring", sliding_window=6, remat_policy="full", scan_layers=False)),
    "ring-context4-fsdp2": (dict(fsdp=2, context=4),
                            dict(context_parallel="ring", context_load_balance=False)),
    "all_gather-balanced-context2-tensor4": (  # 2 key/value heads on 4 tensor devices.
        dict(fsdp=1, context=2, tensor=4), dict(context_parallel="all_gather")),
    "all_gather-context2-fsdp2-tensor2": (  # GQA 4/2 split over tensor with its queries.
        dict(fsdp=2, context=2, tensor=2),
        dict(context_parallel="all_gather", context_load_balance=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_loss_and_gradients_equal_the_unsplit_model(case, batch, params, references):
    mesh_shape, changes = CASES[case]
    mesh = sharding.make_mesh({"data": 1, "tensor": 1, **mesh_shape})
    loss, logits, grads = loss_logits_and_grads(llama(**changes), mesh, batch, params)
    ref_loss, ref_logits, ref_grads = references[changes.get("sliding_window")]
    real = batch["segment_ids"] > 0  # Padding queries' outputs are never used (see the module).
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=2e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_load_balance_order_gives_each_device_chunks_i_and_2n_minus_1_minus_i():
    order = context_parallel.load_balance_order(16, 4)  # 8 chunks of 2 tokens.
    per_device = order.reshape(4, 4) // 2
    np.testing.assert_array_equal(per_device, [[0, 0, 7, 7], [1, 1, 6, 6], [2, 2, 5, 5],
                                               [3, 3, 4, 4]])
    assert sorted(order) == list(range(16))
    # Under causal attention every device then has the same number of visible (query, key) pairs.
    visible = (order[None, :] <= order[:, None]).reshape(4, 4, 16).sum(axis=(1, 2))
    assert len(set(visible.tolist())) == 1


def train(config, mesh, batches):
    """(state, losses) of the real train step, compiled as the tests above compile."""
    state, step, batch_sharding, rules = setup(config, mesh)
    losses = []
    with sharding.use_mesh(mesh, rules):
        batches = [trainer.to_global(b, batch_sharding) for b in batches]
        compiled = step.lower(state, batches[0]).compile(FAST_COMPILE)
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
    return state, losses


def test_training_steps_equal_one_device():
    """Three AdamW steps of the real train step (ring, load balanced) on context 4 × fsdp 2."""
    config = tiny_config("llama-tiny")
    config.model.update(dict(num_layers=1, num_kv_heads=2, attention_impl="einsum"))
    batches = make_batches(3)
    ref_state, ref_losses = train(config, one_device_mesh(), batches)
    state, losses = train(config, sharding.make_mesh(dict(data=1, fsdp=2, context=4, tensor=1)),
                          batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    # Adam divides by the root of the squared gradient: where a gradient is ~0 (rare tokens'
    # embeddings), float32 reduction-order noise becomes a step of up to lr; the tolerance allows
    # a fraction of one (lr 1e-2) after tight gradients (the test above).
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                            jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_bad_lengths_and_unsupported_combinations_fail_with_the_fix(batch, params):
    with pytest.raises(ValueError, match=r"multiple of 8.*context_load_balance=False"):
        context_parallel.load_balance_order(12, 4)
    with pytest.raises(ValueError, match=r"multiple of 4.*mesh.context"):
        context_parallel.check_length(10, 4, load_balanced=False)
    with pytest.raises(ValueError, match="context_parallel"):
        llama(context_parallel="ulysses")
    with pytest.raises(ValueError, match=r"needs \['positions'\].*context_load_balance=False"):
        context_parallel.reorder_batch({"segment_ids": jnp.ones((2, 8), jnp.int32)}, 2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "context": 4, "tensor": 1})
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(llama()))), params)
    ids = jnp.asarray(batch["inputs"])
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        with pytest.raises(ValueError, match=r"output_attentions.*mesh.context=1"):
            jax.eval_shape(lambda: model(ids, output_attentions=True))
        with pytest.raises(ValueError, match=r"sequence length 12.*multiple of 8"):
            jax.eval_shape(lambda: model(ids[:, :12]))
    rules = [("length", None), *sharding.DEFAULT_RULES]
    with (sharding.use_mesh(mesh, rules),
          pytest.raises(ValueError, match=r"'length' mapped to the mesh axis 'context'")):
        jax.eval_shape(lambda: model(ids))
