"""Model behaviour: causality, padding, packing, scan/unroll, remat, presets, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.inference.decode import decoding_model
from transformer.models import build_model, count_params, get_preset
from transformer.models.blocks import LayerList

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=32,
            dropout_rate=0.0, attention_dropout_rate=0.0)
FAMILIES = {
    "bert": get_preset("bert-tiny", **TINY),
    "gpt2": get_preset("gpt2-tiny", **TINY),
    "llama": get_preset("llama-tiny", **TINY, num_kv_heads=2),
}
DECODERS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def models():
    return {name: build_model(cfg, seed=1) for name, cfg in FAMILIES.items()}


@pytest.fixture(scope="module")
def forward(models):
    """One jitted forward per family, reused across tests."""
    fns = {}
    for name, model in models.items():
        graphdef, state = nnx.split(model)

        @jax.jit
        def fn(ids, mask=None, segments=None, positions=None, graphdef=graphdef, state=state):
            out = nnx.merge(graphdef, state)(ids, mask, segment_ids=segments, positions=positions)
            return out.last_hidden_state, out.logits

        fns[name] = fn
    return fns


def tokens(batch=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 128, (batch, length)), jnp.int32)


@pytest.mark.parametrize("family", DECODERS)
def test_changing_future_tokens_changes_nothing_before(forward, family):
    ids = tokens()
    t = 6
    changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 128)
    h1, l1 = forward[family](ids)
    h2, l2 = forward[family](changed)
    np.testing.assert_array_equal(h1[:, : t + 1], h2[:, : t + 1])
    np.testing.assert_array_equal(l1[:, : t + 1], l2[:, : t + 1])
    assert not np.allclose(h1[:, t + 1:], h2[:, t + 1:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_changes_no_output_at_real_positions(forward, family):
    ids = tokens()
    mask = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
    other_padding = ids.at[1, 7:].set(3)
    h1, _ = forward[family](ids, mask)
    h2, _ = forward[family](other_padding, mask)
    np.testing.assert_allclose(h1[1, :7], h2[1, :7], atol=1e-6)
    np.testing.assert_allclose(h1[0], h2[0], atol=1e-6)
    # And the real positions equal running the unpadded sequence alone.
    alone, _ = forward[family](ids[1:, :7])
    np.testing.assert_allclose(h1[1, :7], alone[0], atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_row_equals_sequences_run_alone(forward, family):
    a, b = tokens(1, 5, seed=1), tokens(1, 7, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    hp, lp = forward[family](packed, None, segments, positions)
    ha, la = forward[family](a)
    hb, lb = forward[family](b)
    np.testing.assert_allclose(hp[:, :5], ha, atol=1e-5)
    np.testing.assert_allclose(hp[:, 5:], hb, atol=1e-5)
    np.testing.assert_allclose(lp[:, 5:], lb, atol=1e-4)


def loss_and_grads(config, ids):
    model = build_model(config, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(ids).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss_fn)(params)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_equals_unrolled_outputs_and_gradients(family):
    ids = tokens()
    cfg = FAMILIES[family]
    scanned = loss_and_grads(cfg.replace(scan_layers=True), ids)
    unrolled = loss_and_grads(cfg.replace(scan_layers=False), ids)
    np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(scanned[1]), jax.tree.leaves(unrolled[1])):
        np.testing.assert_allclose(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_give_the_same_gradients(policy, scan):
    ids = tokens()
    cfg = FAMILIES["llama"].replace(scan_layers=scan)
    plain = loss_and_grads(cfg, ids)
    remat = loss_and_grads(cfg.replace(remat_policy=policy), ids)
    for g1, g2 in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "preset, published",
    [
        ("bert-base", 109_482_240),  # BertModel with pooler (the MLM head adds its transform).
        ("bert-large", 335_141_888),
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama-7b", 6_738_415_616),
        ("llama-1b", 1_235_814_400),
    ],
)
def test_preset_parameter_counts_match_published_models(preset, published):
    n = count_params(preset)
    if preset.startswith("bert"):  # Drop the MLM-head transform, which BertModel does not have.
        d, v = get_preset(preset).hidden_size, get_preset(preset).vocab_size
        n -= d * d + d + 2 * d + v
    assert abs(n - published) / published < 0.005


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_compute_stays_close_to_float32(models, family):
    ids = tokens()
    cfg = FAMILIES[family]
    f32 = build_model(cfg, seed=1)(ids)
    bf16 = build_model(cfg.replace(dtype="bfloat16"), seed=1)(ids)
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    assert bf16.logits.dtype == jnp.float32  # Logits (and the losses on them) in float32.
    err = np.abs(np.asarray(bf16.logits) - np.asarray(f32.logits)).max()
    scale = np.abs(np.asarray(f32.logits)).max()
    assert err / scale < 3e-2  # Stated tolerance: 3% of the logit range.
    params = nnx.state(build_model(cfg.replace(dtype="bfloat16")), nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def test_dropout_only_with_a_key(models):
    cfg = FAMILIES["bert"].replace(dropout_rate=0.3, attention_dropout_rate=0.3)
    model = build_model(cfg, seed=1)
    ids = tokens()
    a, b = model(ids).logits, model(ids).logits
    np.testing.assert_array_equal(a, b)
    c = model(ids, dropout_rng=jax.random.key(0)).logits
    d = model(ids, dropout_rng=jax.random.key(1)).logits
    assert not np.allclose(a, c) and not np.allclose(c, d)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_weights_output(models, family):
    out = models[family](tokens(), output_attentions=True)
    cfg = FAMILIES[family]
    assert out.attentions.shape == (cfg.num_layers, 2, cfg.num_heads, 12, 12)
    np.testing.assert_allclose(np.asarray(out.attentions).sum(-1), 1.0, atol=1e-5)
    if cfg.causal:
        assert np.all(np.triu(np.asarray(out.attentions), k=1) == 0)


def test_bert_outputs_pooler_and_tied_mlm_logits(models):
    model = models["bert"]
    out = model(tokens(), token_type_ids=jnp.ones((2, 12), jnp.int32))
    assert out.pooler_output.shape == (2, 32) and np.all(np.abs(out.pooler_output) <= 1)
    assert out.logits.shape == (2, 12, 128)
    assert not hasattr(model, "lm_head")  # Tied: the embedding matrix is the output layer.


@pytest.mark.parametrize("layers", ["stacked", "list"])
@pytest.mark.parametrize("family", DECODERS)
def test_cached_decoding_equals_full_forward(models, family, layers):
    model = models[family]
    ids = tokens(2, 10)
    full = model(ids).logits
    if layers == "list":  # The decoding layout: one module per layer, a list of caches.
        model = decoding_model(model)
        assert isinstance(model.layers, LayerList) and len(model.init_cache(2, 16)) == len(
            model.layers.blocks)
    cache = model.init_cache(2, 16)
    slots = jnp.zeros((2, 16), jnp.int32)
    prefill = 6
    slots = slots.at[:, :prefill].set(1)
    out = model(ids[:, :prefill], cache=cache, cache_index=0, cache_segment_ids=slots)
    np.testing.assert_allclose(out.logits, full[:, :prefill], atol=1e-5)
    cache = out.cache
    for t in range(prefill, 10):
        slots = slots.at[:, t].set(1)
        step = model(ids[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache, cache_index=t,
                     cache_segment_ids=slots)
        cache = step.cache
        np.testing.assert_allclose(step.logits[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get_preset("gpt3"), "unknown model preset 'gpt3'"),
        (lambda: get_preset("gpt2", hidden_size=100), "hidden_size=100 is not divisible"),
        (lambda: get_preset("llama-tiny", num_kv_heads=3), "num_kv_heads=3 must divide"),
        (lambda: get_preset("gpt2", activation="swish"), "activation='swish' is not one of"),
        (lambda: get_preset("gpt2", num_layer=2), "did you mean ['num_layers'"),
        (lambda: get_preset("gpt2").replace(remat="full"), "unknown ModelConfig field 'remat'"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_field(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)
