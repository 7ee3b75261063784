"""An encoder-decoder sharded over four meshes equals one device: teacher-forced loss and logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.test_sharding import check_parameter_shardings
from transformer import sharding
from transformer.inference.decode import place_batch
from transformer.models import build_model, get_preset

CONFIG = get_preset("t5-tiny", dropout_rate=0.0)  # 4 heads, width 32: divisible by the meshes.
MESHES = {"data 8": (8, 1, 1), "fsdp 8": (1, 8, 1), "data 2 x fsdp 4": (2, 4, 1),
          "fsdp 4 x tensor 2": (1, 4, 2)}


def teacher_forced(graphdef, state, source, source_mask, inputs, targets, target_mask):
    out = nnx.merge(graphdef, state)(source, inputs, attention_mask=source_mask,
                                     decoder_attention_mask=target_mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets)
    return jnp.sum(losses * target_mask) / jnp.sum(target_mask), out.logits


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    source = rng.integers(2, CONFIG.vocab_size, (8, 12)).astype(np.int32)
    source_mask = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)
    targets = rng.integers(2, CONFIG.vocab_size, (8, 7)).astype(np.int32)
    target_mask = (np.arange(7)[None] < rng.integers(2, 8, (8, 1))).astype(np.int32)
    inputs = np.concatenate([np.full((8, 1), CONFIG.decoder_start_token_id), targets[:, :-1]], 1)
    return source * source_mask, source_mask, inputs * target_mask, targets, target_mask


@pytest.fixture(scope="module")
def expected(batch):
    graphdef, state = nnx.split(build_model(CONFIG, seed=0))
    return jax.jit(teacher_forced, static_argnums=0)(graphdef, state, *batch)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_teacher_forcing_equals_one_device(name, batch, expected):
    mesh = sharding.make_mesh(MESHES[name])
    rules = sharding.DEFAULT_RULES
    graphdef, state = nnx.split(build_model(CONFIG, seed=0))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    check_parameter_shardings(nnx.merge(graphdef, state), mesh)
    with sharding.use_mesh(mesh, rules):
        placed = place_batch(batch, mesh, rules)  # Rows split by the 'batch' rule.
        loss, logits = jax.jit(teacher_forced, static_argnums=0)(graphdef, state, *placed)
    assert abs(float(loss) - float(expected[0])) <= 1e-5
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[1]), atol=2e-5)
