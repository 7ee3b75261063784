"""Attention against the float64 NumPy equations, masks, GQA and RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models import reference
from transformer.models import dot_product_attention, get_preset, make_attention_mask
from transformer.models import positions as pos
from transformer.models.attention import MultiHeadAttention

B, T, H, D = 2, 7, 4, 8


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def random_qkv(kv_heads=H, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, kv_heads, D)).astype(np.float32)
    v = rng.normal(size=(B, T, kv_heads, D)).astype(np.float32)
    return q, k, v


def masks():
    lengths = np.array([T, 4])
    padding = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    packed = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 3, 0, 0]], np.int32)
    causal_only = np.ones((B, T), np.int32)
    return {
        "none": None,
        "padding": make_attention_mask(padding, padding, causal=False),
        "causal": make_attention_mask(causal_only, causal_only, causal=True),
        "causal+padding": make_attention_mask(padding, padding, causal=True),
        "packed": make_attention_mask(packed, packed, causal=False),
        "packed+causal": make_attention_mask(packed, packed, causal=True),
    }


MASKS = masks()


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kv_heads", [H, 2, 1])
def test_attention_matches_float64_equations(impl, mask_name, kv_heads):
    q, k, v = random_qkv(kv_heads)
    mask = MASKS[mask_name]
    out, _ = dot_product_attention(q, k, v, mask, impl=impl)
    expected = reference.attention(q, k, v, None if mask is None else np.asarray(mask))
    if mask is not None:  # Rows with no visible key (padding queries) are undefined: skip them.
        visible = np.asarray(mask).any(-1)[:, 0]  # [B, T]
        out, expected = np.asarray(out)[visible], expected[visible]
    assert rel_error(out, expected) < 1e-5


def test_backends_agree_and_weights_are_a_distribution():
    q, k, v = random_qkv(2)
    mask = MASKS["packed+causal"]
    a, weights = dot_product_attention(q, k, v, mask, impl="einsum", return_weights=True)
    b, _ = dot_product_attention(q, k, v, mask, impl="xla")
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    full_mask = np.broadcast_to(np.asarray(mask), weights.shape)
    real_queries = full_mask.any(-1, keepdims=True)  # Padding queries see nothing: undefined.
    assert np.all(np.asarray(weights)[~full_mask & real_queries] == 0)


def test_attention_dropout_is_random_in_training_and_off_in_evaluation():
    q, k, v = random_qkv()
    plain, _ = dot_product_attention(q, k, v, impl="einsum")
    no_rng, _ = dot_product_attention(q, k, v, impl="einsum", dropout_rate=0.5)
    dropped, _ = dot_product_attention(
        q, k, v, impl="einsum", dropout_rate=0.5, dropout_rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(plain, no_rng)
    assert not np.allclose(plain, dropped)
    # Inverted dropout keeps the expectation: average over many masks approaches the plain output.
    keys = jax.random.split(jax.random.key(1), 400)
    mean = jax.vmap(
        lambda r: dot_product_attention(q, k, v, impl="einsum", dropout_rate=0.5, dropout_rng=r)[0]
    )(keys).mean(0)
    assert np.abs(np.asarray(mean) - np.asarray(plain)).mean() < 0.05


def module_params(module):
    get = lambda name: np.asarray(getattr(module, name)[...], np.float64)
    return {n: get(n) for n in ("query", "key", "value", "out")}


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_multi_head_module_matches_equations(impl):
    cfg = get_preset("gpt2-tiny", hidden_size=32, num_heads=4, attention_impl=impl)
    mha = MultiHeadAttention(cfg, rngs=nnx.Rngs(0))
    for name in ("query_bias", "key_bias", "value_bias", "out_bias"):  # Non-zero biases.
        b = getattr(mha, name)
        b[...] = jax.random.normal(jax.random.key(len(name)), b[...].shape)
    x = np.random.default_rng(1).normal(size=(B, T, 32)).astype(np.float32)
    segments = np.array([[1] * T, [1] * 5 + [0] * 2])
    mask = make_attention_mask(segments, segments, causal=True)
    y, _, _ = mha(x, mask=mask, positions=jnp.zeros((B, T), jnp.int32))
    p = module_params(mha)
    biases = {n: np.asarray(getattr(mha, n + "_bias")[...], np.float64) for n in
              ("query", "key", "value", "out")}
    expected = reference.multi_head_attention(
        x, p["query"], p["key"], p["value"], p["out"], biases["query"], biases["key"],
        biases["value"], biases["out"], mask=np.asarray(mask),
    )
    assert rel_error(y, expected) < 1e-5


def test_gqa_with_all_kv_heads_is_multi_head_and_grouping_repeats_kv_heads():
    x = np.random.default_rng(2).normal(size=(B, T, 32)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    base = dict(hidden_size=32, num_heads=4)
    mha = MultiHeadAttention(get_preset("llama-tiny", **base, num_kv_heads=None), rngs=nnx.Rngs(0))
    gqa = MultiHeadAttention(get_preset("llama-tiny", **base, num_kv_heads=4), rngs=nnx.Rngs(0))
    a = mha(x, mask=None, positions=positions)[0]
    b = gqa(x, mask=None, positions=positions)[0]
    np.testing.assert_array_equal(a, b)
    # Two kv heads shared by two query heads each == four kv heads holding each twice.
    grouped = MultiHeadAttention(get_preset("llama-tiny", **base, num_kv_heads=2), rngs=nnx.Rngs(3))
    full = MultiHeadAttention(get_preset("llama-tiny", **base, num_kv_heads=4), rngs=nnx.Rngs(4))
    full.query[...] = grouped.query[...]
    full.out[...] = grouped.out[...]
    full.key[...] = jnp.repeat(grouped.key[...], 2, axis=1)
    full.value[...] = jnp.repeat(grouped.value[...], 2, axis=1)
    np.testing.assert_allclose(
        grouped(x, mask=None, positions=positions)[0],
        full(x, mask=None, positions=positions)[0], atol=1e-6,
    )


@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    cfg = get_preset("llama-tiny", rope_scaling=scaling, rope_factor=4.0,
                     rope_original_max_length=64)
    inv_freq = pos.rope_inverse_frequencies(cfg)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 1, 1, cfg.dim_per_head)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, cfg.dim_per_head)).astype(np.float32)

    def score(m, n):
        rq = pos.apply_rope(q, jnp.array([[m]]), inv_freq, pos.rope_position_scale(cfg))
        rk = pos.apply_rope(k, jnp.array([[n]]), inv_freq, pos.rope_position_scale(cfg))
        return float(jnp.sum(rq * rk))

    for m, n in [(5, 2), (17, 3), (40, 40)]:
        for shift in (1, 9, 100):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)  # It does see the distance.
    # Rotation preserves norms.
    rotated = pos.apply_rope(q, jnp.array([[123]]), inv_freq)
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(q), rel=1e-5)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    cfg = get_preset("llama-1b")
    plain = pos.rope_inverse_frequencies(cfg.replace(rope_scaling="none"))
    scaled = pos.rope_inverse_frequencies(cfg)
    wavelength = 2 * np.pi / plain
    high = wavelength < cfg.rope_original_max_length / cfg.rope_high_freq_factor
    low = wavelength > cfg.rope_original_max_length / cfg.rope_low_freq_factor
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / cfg.rope_factor, rtol=1e-6)
    middle = ~high & ~low
    assert middle.any()
    assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 32))


def test_sinusoidal_matches_the_paper():
    p = np.arange(50)
    pe = np.asarray(pos.sinusoidal(jnp.asarray(p), 16))
    i = np.arange(8)
    angle = p[:, None] / 10000 ** (2 * i[None] / 16)
    np.testing.assert_allclose(pe[:, 0::2], np.sin(angle), atol=1e-5)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(angle), atol=1e-5)
