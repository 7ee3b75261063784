"""Mixture-of-experts block: dropless == dense reference == a float64 NumPy loop over tokens
(outputs and gradients), top-1/top-2, renormalized or not, shared expert, ties, empty experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.models import ModelConfig, get_preset
from transformer.models.moe import MoEMLP, load_balancing_loss, route

BASE = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24, num_experts=4)
CASES = {
    "top1": dict(num_experts_per_token=1),
    "top2_renorm": dict(num_experts_per_token=2, moe_renormalize=True),
    "top2_plain_shared": dict(num_experts_per_token=2, moe_renormalize=False,
                              moe_shared_expert_dim=20),
}


def _config(**kw) -> ModelConfig:
    return get_preset("llama-tiny", **{**BASE, **kw})


def _silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_moe(x, p, top_k, renormalize, kept=None):
    """Per token: softmax router, top-k (lower id first on ties), Σ w · SwiGLU expert (+ shared);
    `kept` [tokens, k] (default all) names the (token, choice) pairs an expert takes."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    out = np.zeros_like(x)
    for n, token in enumerate(x):
        logits = token @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:top_k]
        weights = probs[chosen] / (probs[chosen].sum() if renormalize else 1.0)
        for j, (e, w) in enumerate(zip(chosen, weights)):
            if kept is not None and not kept[n, j]:
                continue
            out[n] += w * ((_silu(token @ p["wi"][e]) * (token @ p["wi_gate"][e])) @ p["wo"][e])
        if "shared_wi" in p:
            gate = 1.0 / (1.0 + np.exp(-(token @ p["shared_gate"])[0]))
            out[n] += gate * ((_silu(token @ p["shared_wi"]) * (token @ p["shared_wi_gate"]))
                              @ p["shared_wo"])
    return out


def _params(module):
    return {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(module)).items()}


def _outputs_and_grads(config, state, x, cotangent):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoEMLP(config, rngs=nnx.Rngs(0))))

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return y, grads


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    return x, jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tied", [False, True], ids=["random_router", "tied_router"])
def test_dropless_equals_dense_and_numpy(case, tied, inputs):
    x, cotangent = inputs
    dropless = _config(**CASES[case], moe_impl="dropless")
    module = MoEMLP(dropless, rngs=nnx.Rngs(1))
    if tied:  # A zero router ties every expert: top-k takes the lowest ids, the rest get nothing.
        module.router[...] = jnp.zeros_like(module.router[...])
    state = nnx.state(module)
    y_sparse, g_sparse = _outputs_and_grads(dropless, state, x, cotangent)
    y_dense, g_dense = _outputs_and_grads(dropless.replace(moe_impl="dense"), state, x, cotangent)
    np.testing.assert_allclose(y_sparse, y_dense, atol=1e-6, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    reference = numpy_moe(np.asarray(x), _params(module), dropless.num_experts_per_token,
                          dropless.moe_renormalize)
    np.testing.assert_allclose(np.asarray(y_sparse).reshape(-1, 16), reference, atol=2e-6,
                               rtol=1e-5)
    if tied:  # Experts beyond top_k received no token: their weights get exactly zero gradient.
        wi_grad = g_sparse[0]["wi"][...]
        k = dropless.num_experts_per_token
        assert np.all(np.asarray(wi_grad[k:]) == 0) and np.any(np.asarray(wi_grad[:k]) != 0)


def test_route_ties_and_balanced_load_balancing_loss():
    probs, weights, experts = route(jnp.zeros((6, 4)), 2, renormalize=True)
    np.testing.assert_array_equal(experts, np.tile([0, 1], (6, 1)))
    np.testing.assert_allclose(weights, 0.5)
    # Balanced: each expert gets 1/E of the assignments and of the probability → loss = top_k.
    stats = {"expert_tokens": jnp.full((3, 4), 2 * 8 / 4), "expert_probs": jnp.full((3, 4), 8 / 4),
             "tokens": jnp.full((3,), 8.0)}
    np.testing.assert_allclose(load_balancing_loss(stats), 2.0, rtol=1e-6)


def test_padding_is_excluded_from_router_stats(inputs):
    x, _ = inputs
    graphdef, state = nnx.split(MoEMLP(_config(num_experts_per_token=2), rngs=nnx.Rngs(1)))
    run = jax.jit(lambda state, x, mask: nnx.merge(graphdef, state)(x, mask)[1])
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    stats = run(state, x, mask)
    only_real = run(state, jnp.concatenate([x[0, :3], x[1]])[None], jnp.ones((1, 8)))
    for key in stats:
        np.testing.assert_allclose(stats[key], only_real[key], rtol=1e-5)
    assert float(stats["tokens"]) == 8 and float(stats["expert_tokens"].sum()) == 16


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts=4, num_experts_per_token=5), "num_experts_per_token=5"),
    (dict(num_experts=4, moe_every=3), "moe_every=3"),
    (dict(num_experts=4, moe_impl="sparse"), "moe_impl"),
    (dict(num_experts=4, moe_dispatch="manual"), "moe_dispatch"),
    (dict(num_experts=4, moe_dispatch="all_to_all", moe_impl="dense"), "moe_impl='dropless'"),
    (dict(num_experts=4, moe_capacity_factor=-1.0), "moe_capacity_factor=-1.0"),
    (dict(num_experts=4, lora_rank=4, lora_targets=("query",)), "LoRA"),
])
def test_bad_moe_config(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_every_second_layer_moe_scanned_equals_unrolled():
    from transformer.models import Decoder, build_model

    config = _config(moe_every=2, moe_shared_expert_dim=8)
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 64, (2, 6)), jnp.int32)
    model = build_model(config, seed=2)
    assert model.layers.blocks.mlp.wi[...].shape == (1, 16, 24)  # Layer 0 dense, ...
    assert model.layers.moe_blocks.mlp.wi[...].shape == (1, 4, 16, 24)  # ... layer 1 MoE.
    state = nnx.state(model)
    unrolled = nnx.eval_shape(lambda: Decoder(config.replace(scan_layers=False), rngs=nnx.Rngs(0)))
    outputs = []
    for graphdef in (nnx.graphdef(model), nnx.graphdef(unrolled)):  # Same parameters.
        out = jax.jit(lambda s, graphdef=graphdef: nnx.merge(graphdef, s)(ids))(state)
        outputs.append((out.logits, out.router_stats["tokens"]))
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    np.testing.assert_array_equal(outputs[0][1], [12])  # Statistics of the one MoE layer.
