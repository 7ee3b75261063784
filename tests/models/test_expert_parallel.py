"""Expert parallelism by an explicit all-to-all: on 8 simulated devices (expert 8; expert 4 ×
fsdp 2) the all-to-all dispatch equals the partitioner's and one device (outputs and gradients),
top-1 and top-2, with an expert that receives no token; capacity-factor dropping drops exactly
the pairs a NumPy loop picks, on every mesh; bad buffers and expert counts are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.models.test_moe import _config, _params, numpy_moe
from transformer import sharding
from transformer.models.expert_parallel import all_to_all_experts
from transformer.models.moe import MoEMLP, capacity_keep, expert_capacity

RULES = sharding.DEFAULT_RULES
EMPTY_EXPERT = 5
MESHES = {"expert8": dict(data=1, fsdp=1, expert=8, tensor=1),
          "expert4_fsdp2": dict(data=1, fsdp=2, expert=4, tensor=1)}


def _module(top_k, **changes):
    config = _config(num_experts=8, num_experts_per_token=top_k, **changes)
    module = MoEMLP(config, rngs=nnx.Rngs(3))
    # Feature 0 of every input is 3 (below), so a router column of -50 there keeps one expert
    # out of every top-k: it receives no token.
    router = module.router[...].at[:, EMPTY_EXPERT].set(0.0).at[0, EMPTY_EXPERT].set(-50.0)
    module.router[...] = router
    return config, nnx.state(module)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 16)).astype(np.float32)
    x[..., 0] = 3.0
    return jnp.asarray(x), jnp.asarray(rng.normal(size=x.shape), jnp.float32)


def run(config, state, x, cotangent, mesh=None):
    """(output, router statistics, gradients of the parameters and the input), jitted, on
    `mesh` (sharded as training shards them) or on one device."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoEMLP(config, rngs=nnx.Rngs(0))))

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * cotangent), (y, stats)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (_, (y, stats)), grads = step(state, x)
        return y, stats, grads
    state = jax.device_put(state, sharding.state_shardings(state, mesh, RULES))
    x = jax.device_put(x, NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", None, None), RULES, x.shape, mesh)))
    with sharding.use_mesh(mesh, RULES):
        lowered = step.lower(state, x)
        exchanges = config.moe_dispatch == "all_to_all" and mesh.shape.get("expert", 1) > 1
        assert ("all_to_all" in lowered.as_text()) == exchanges
        (_, (y, stats)), grads = lowered.compile()(state, x)
    return y, stats, grads


def assert_trees_close(a, b, atol=2e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=1e-5)


# The partitioner on expert 4 × fsdp 2 is compared with one device in tests/train/test_moe_training.py.
@pytest.mark.parametrize("top_k, mesh_name, dispatches", [
    (1, "expert8", ("partitioner", "all_to_all")), (2, "expert4_fsdp2", ("all_to_all",))])
def test_all_to_all_equals_partitioner_and_one_device(inputs, top_k, mesh_name, dispatches):
    x, cotangent = inputs
    config, state = _module(top_k)
    y_one, stats, g_one = run(config, state, x, cotangent)
    assert float(stats["expert_tokens"][EMPTY_EXPERT]) == 0  # The empty expert is empty ...
    mesh = sharding.make_mesh(MESHES[mesh_name])
    for dispatch in dispatches:
        y, _, grads = run(config.replace(moe_dispatch=dispatch), state, x, cotangent, mesh)
        assert_trees_close((y, grads), (y_one, g_one))
    # ... and experts without tokens get exactly no gradient, the others some.
    has_tokens = np.asarray(stats["expert_tokens"]) > 0
    np.testing.assert_array_equal(np.any(np.asarray(grads[0]["wi"][...]) != 0, axis=(1, 2)),
                                  has_tokens)
    reference = numpy_moe(np.asarray(x), _params_of(config, state), top_k, True)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), reference, atol=2e-6, rtol=1e-5)


def _params_of(config, state):
    return _params(nnx.merge(nnx.graphdef(nnx.eval_shape(
        lambda: MoEMLP(config, rngs=nnx.Rngs(0)))), state))


def numpy_keep(experts, token_mask, capacity):
    """Per sequence and expert, take pairs in order (choice 0 of every position, then choice 1,
    ...) while fewer than `capacity` are taken; padding takes nothing."""
    batch, length, k = experts.shape
    keep = np.zeros(experts.shape, bool)
    for b in range(batch):
        taken = {}
        for j in range(k):
            for t in range(length):
                e = experts[b, t, j]
                if token_mask[b, t] and taken.get(e, 0) < capacity:
                    taken[e] = taken.get(e, 0) + 1
                    keep[b, t, j] = True
    return keep


def test_capacity_keep_matches_numpy():
    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(6)[:3] for _ in range(4 * 20)]).reshape(4, 20, 3)
    mask = (rng.random((4, 20)) < 0.8).astype(np.int32)
    for capacity in (1, 4, 9):
        keep = capacity_keep(jnp.asarray(experts), jnp.asarray(mask), capacity, 6)
        np.testing.assert_array_equal(keep, numpy_keep(experts, mask, capacity))


def test_dropping_is_the_same_on_every_mesh_and_matches_numpy(inputs):
    x, cotangent = inputs
    config, state = _module(2, moe_capacity_factor=0.5, moe_dispatch="all_to_all")
    y, stats, _ = run(config, state, x, cotangent, sharding.make_mesh(MESHES["expert4_fsdp2"]))
    # A mesh without 'expert': no exchange, each device's buffer sized for its own tokens.
    y_fsdp, stats_fsdp, _ = run(config, state, x, cotangent,
                                sharding.make_mesh(dict(data=1, fsdp=8, tensor=1)))
    np.testing.assert_allclose(y_fsdp, y, atol=2e-6, rtol=1e-5)
    # Which pairs drop: NumPy's choice from the router's top-2, on one host.
    params = _params_of(config, state)
    logits = np.asarray(x, np.float64).reshape(-1, 16) @ params["router"]
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :2].reshape(8, 6, 2)
    capacity = expert_capacity(6, 2, 8, 0.5)
    keep = numpy_keep(chosen, np.ones((8, 6)), capacity)
    assert 0 < (~keep).sum() == float(stats["dropped"]) == float(stats_fsdp["dropped"])
    reference = numpy_moe(np.asarray(x), params, 2, True, kept=keep.reshape(-1, 2))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), reference, atol=2e-6, rtol=1e-5)


def _call(mesh_shape, num_experts, **kw):
    x = jnp.ones((8, 4, 16))
    experts = jnp.zeros((8, 4, 2), jnp.int32).at[..., 1].set(1)
    w = jnp.ones((num_experts, 16, 8))
    with sharding.use_mesh(sharding.make_mesh(mesh_shape), RULES):
        return all_to_all_experts(x, jnp.ones((8, 4, 2)), experts, w, w,
                                  jnp.ones((num_experts, 8, 16)), jax.nn.silu, **kw)


def test_buffer_too_small_for_dropless_is_refused():
    # 4 tokens a device, top-2 over 8 experts on 8 devices: up to 4 pairs go to one device.
    with pytest.raises(ValueError, match="buffer of 3 rows .* up to 4 .* moe_capacity_factor > 0"):
        _call(MESHES["expert8"], 8, buffer_rows=3)
    with pytest.raises(ValueError, match="buffer of 1 rows .* up to 2 .* pairs"):
        _call(MESHES["expert8"], 8, buffer_rows=1, expert_capacity=2)


def test_expert_axis_that_does_not_divide_the_experts_is_refused():
    with pytest.raises(ValueError, match="6 experts do not split over the 4 devices"):
        _call(MESHES["expert4_fsdp2"], 6)
