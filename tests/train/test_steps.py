"""The jitted train step: sharded == one device, accumulation == big batch, the non-finite guard,
optimizer pieces, and checkpoints across meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from transformer import sharding
from transformer.models import ModelConfig
from transformer.train import checkpointing, optimizer, trainable, trainer
from transformer.train import state as train_state
from transformer.train import step as step_lib
from transformer.train.config import base_config

B, T, V = 16, 16, 128


def tiny_config(preset="gpt2-tiny", **changes):
    c = base_config(preset)
    c.model.update(dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                        max_length=T, dropout_rate=0.0, attention_dropout_rate=0.0))
    c.data.global_batch_size = B
    c.data.max_length = T
    c.learning_rate = 1e-2
    c.warmup_steps = 2
    c.num_train_steps = 10
    c.update(changes)
    return c


def make_batches(n, seed=0, batch=B):
    """Packed causal-LM rows (two segments per row), as the data pipeline produces them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        inputs = rng.integers(1, V, (batch, T)).astype(np.int32)
        cut = rng.integers(3, T - 3, (batch, 1))
        col = np.arange(T)[None]
        segment_ids = np.where(col < cut, 1, 2).astype(np.int32)
        positions = np.where(col < cut, col, col - cut).astype(np.int32)
        targets = np.roll(inputs, -1, axis=1)
        weights = (segment_ids == np.roll(segment_ids, -1, axis=1)).astype(np.float32)
        weights[:, -1] = 0
        out.append(dict(inputs=inputs, targets=targets, weights=weights,
                        segment_ids=segment_ids, positions=positions))
    return out


def setup(config, mesh):
    rules = [tuple(r) for r in config.logical_axis_rules]
    model_config = ModelConfig.from_dict(config.model.to_dict())
    tx, schedule = optimizer.make_optimizer(config)
    state, shardings, graphdef = train_state.create_train_state(
        model_config, tx, mesh, rules, config.seed, trainable.predicate(config),
        config.finetune.frozen_dtype)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "length"), rules, (config.data.global_batch_size, T), mesh))
    step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding)
    return state, step, batch_sharding, rules


def train(config, mesh, batches, metrics_out=None):
    """(state, losses); every step's metrics are appended to `metrics_out` when given."""
    state, step, batch_sharding, rules = setup(config, mesh)
    losses = []
    with sharding.use_mesh(mesh, rules):
        for batch in batches:
            state, metrics = step(state, trainer.to_global(batch, batch_sharding))
            losses.append(float(metrics["loss"]))
            if metrics_out is not None:
                metrics_out.append({k: np.asarray(v) for k, v in metrics.items()})
    return state, losses


def one_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference_run():
    return train(tiny_config(), one_device_mesh(), make_batches(5))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_training_equals_one_device(reference_run, shape):
    state, losses = train(tiny_config(), sharding.make_mesh(shape), make_batches(5))
    ref_state, ref_losses = reference_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert_params_close(state.params, ref_state.params)


def assert_params_close(params, expected):
    """Float32 agreement after 5 AdamW steps at lr 1e-2. The key bias is excluded: its gradient
    is mathematically zero (softmax ignores a constant added to a row of scores), so Adam
    normalizes pure reduction-order noise there and any change of summation order shows."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(expected)):
        if "key_bias" in jax.tree_util.keystr(path):
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_gradient_accumulation_equals_the_big_batch(reference_run):
    state, losses = train(tiny_config(grad_accum_steps=4), sharding.make_mesh((2, 2, 2)),
                          make_batches(5))
    ref_state, ref_losses = reference_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_params_close(state.params, ref_state.params)


def test_non_finite_batch_is_skipped_and_a_streak_stops_the_run():
    config = tiny_config()
    mesh = sharding.make_mesh((8, 1, 1))
    state, step, batch_sharding, rules = setup(config, mesh)
    good, poisoned = make_batches(2)
    poisoned["weights"] = np.full_like(poisoned["weights"], np.nan)
    with sharding.use_mesh(mesh, rules):
        state, metrics = step(state, trainer.to_global(good, batch_sharding))
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = step(state, trainer.to_global(poisoned, batch_sharding))
        assert int(metrics["skipped"]) == 1 and int(metrics["bad_streak"]) == 1
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
            np.testing.assert_array_equal(np.asarray(a), b)  # The update was skipped.
        trainer.check_finite(metrics, config.max_bad_steps, 2)  # One bad step: go on.
        state, metrics = step(state, trainer.to_global(good, batch_sharding))
        assert int(metrics["bad_streak"]) == 0 and int(metrics["skipped"]) == 1
        for _ in range(config.max_bad_steps):
            state, metrics = step(state, trainer.to_global(poisoned, batch_sharding))
    with pytest.raises(trainer.NonFiniteError, match="5 consecutive steps"):
        trainer.check_finite(metrics, config.max_bad_steps, 8)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    config = tiny_config()
    state, _ = train(config, sharding.make_mesh((2, 4, 1)), make_batches(2))
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=True)
    ckpt.save(2, state, None, config.to_dict())
    ckpt.wait()
    saved = jax.tree.map(np.asarray, state)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    tx, _ = optimizer.make_optimizer(config)
    shapes = jax.eval_shape(train_state.make_init_fn(model_config, tx, 0))
    rules = [tuple(r) for r in config.logical_axis_rules]
    for mesh in (sharding.make_mesh((8, 1, 1)), one_device_mesh(), sharding.make_mesh((1, 2, 4))):
        shardings = train_state.state_shardings(
            shapes, train_state.param_shardings(model_config, mesh, rules), mesh)
        restored = ckpt.restore(2, train_state.abstract_state(shapes, shardings), None)
        for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                           jax.tree.leaves(shardings)):
            np.testing.assert_array_equal(np.asarray(a), b)
            assert a.sharding == s
    # A model of another shape is refused, naming the parameter and both shapes.
    other = ModelConfig.from_dict({**config.model.to_dict(), "mlp_dim": 48})
    other_shapes = jax.eval_shape(train_state.make_init_fn(other, tx, 0))
    with pytest.raises(ValueError, match=r"'params/layers/blocks/mlp/bi' has shape \(2, 64\) "
                                         r"but this model needs \(2, 48\)"):
        ckpt.restore(2, other_shapes, None)
    ckpt.close()


def test_schedules_and_weight_decay_mask():
    config = tiny_config(learning_rate=1.0, warmup_steps=10, num_train_steps=110,
                         end_lr_fraction=0.1)
    for name, end in [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)]:
        config.schedule = name
        schedule = optimizer.make_schedule(config)
        assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
        assert float(schedule(10)) == pytest.approx(1.0)
        assert float(schedule(110)) == pytest.approx(end, abs=1e-6)
    config.schedule = "rsqrt"
    schedule = optimizer.make_schedule(config)
    assert float(schedule(10 + 30)) == pytest.approx(0.5)  # lr · sqrt(warmup / step)
    params = {"embeddings": {"tokens": 0}, "final_norm": {"scale": 0, "bias": 0},
              "layers": {"blocks": {"mlp": {"wi": 0, "bi": 0}, "attention": {
                  "query": 0, "query_bias": 0}}}, "lm_head": 0}
    mask = optimizer.decay_mask(params, config)
    assert mask["layers"]["blocks"]["mlp"] == {"wi": True, "bi": False}
    assert mask["layers"]["blocks"]["attention"] == {"query": True, "query_bias": False}
    assert mask["embeddings"]["tokens"] is False and mask["lm_head"] is True
    assert mask["final_norm"] == {"scale": False, "bias": False}
    config.decay_embeddings = True
    assert optimizer.decay_mask(params, config)["embeddings"]["tokens"] is True


def test_bad_batch_and_mesh_fail_before_compiling():
    config = tiny_config(grad_accum_steps=3)
    with pytest.raises(ValueError, match="not divisible by data-parallel size 8"):
        trainer.check_batch(config, sharding.make_mesh((2, 4, 1)))
    with pytest.raises(ValueError, match="has 6 devices but 8 are available"):
        sharding.make_mesh((2, 3, 1))


def test_checkpoints_keep_the_last_n_plus_every_mth(tmp_path):
    state = {"x": np.arange(4.0)}
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, max_to_keep=2, keep_period=4,
                                      async_save=False)
    for step in range(1, 11):
        ckpt.save(step, state, None, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    assert ckpt.restore_config(9) == {"step": 9}
    ckpt.close()


def test_losses_match_float64_reference():
    from transformer.train.losses import cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    log_p = x - log_z[..., None]
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    smooth, z = 0.1, 1e-3
    smoothed = (1 - smooth) * nll - smooth * log_p.mean(-1)
    sums = cross_entropy(logits, targets, weights, label_smoothing=smooth, z_loss=z)
    np.testing.assert_allclose(sums["nll_sum"], (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_sum"], ((smoothed + z * log_z**2) * weights).sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(sums["weight_sum"], weights.sum())
    np.testing.assert_allclose(sums["correct_sum"], ((x.argmax(-1) == targets) * weights).sum())
