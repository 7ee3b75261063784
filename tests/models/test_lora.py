"""LoRA adapters in the model: the base model exactly at initialization, the merged weights the
same function, and configurations that cannot work refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import model_io
from transformer.models import build_model, get_preset
from transformer.models import lora as lora_lib

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48, max_length=32)
PRESETS = {"llama": ("llama-tiny", dict(num_kv_heads=2)), "gpt2": ("gpt2-tiny", {}),
           "bert": ("bert-tiny", {})}


def models(name, **lora):
    preset, extra = PRESETS[name]
    base = build_model(get_preset(preset, **TINY, **extra), seed=0)
    adapted = build_model(base.config.replace(lora_rank=4, lora_targets=("all-linear",), **lora),
                          seed=1)
    # The adapted model holds the base model's weights (its adapters keep their own init).
    state = nnx.state(adapted, nnx.Param)
    flat = {**model_io.flat_params(state), **model_io.flat_params(nnx.state(base, nnx.Param))}
    nnx.replace_by_pure_dict(state, model_io.unflatten(flat))
    nnx.update(adapted, state)
    return base, adapted


IDS = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)


@pytest.mark.parametrize("name", list(PRESETS))
def test_adapters_start_as_the_base_model_exactly(name):
    base, adapted = models(name)
    a = model_io.flat_params(nnx.state(adapted, nnx.Param))
    assert all(np.any(np.asarray(v) != 0) for k, v in a.items() if k.endswith("_lora.a"))
    assert all(np.all(np.asarray(v) == 0) for k, v in a.items() if k.endswith("_lora.b"))
    # B = 0 adds exact zeros; the scanned layer compiles to another fusion with the adapters in
    # it, which can round a post-LN norm differently in the last bit (BERT: ≤ 5e-7).
    np.testing.assert_allclose(np.asarray(adapted(IDS).last_hidden_state),
                               np.asarray(base(IDS).last_hidden_state), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PRESETS))
def test_merged_weights_equal_the_adapters(name):
    _, adapted = models(name, lora_alpha=8.0)
    state = nnx.state(adapted, nnx.Param)
    flat = model_io.flat_params(state)
    keys = jax.random.split(jax.random.key(2), len(flat))
    flat = {k: (0.3 * jax.random.normal(key, v.shape) if k.endswith("_lora.b") else v)
            for (k, v), key in zip(flat.items(), keys)}
    nnx.replace_by_pure_dict(state, model_io.unflatten(flat))
    nnx.update(adapted, state)
    merged_params = lora_lib.merge(flat, adapted.config)
    assert not any("_lora" in k for k in merged_params)
    plain = build_model(adapted.config.replace(lora_rank=0, lora_targets=()), seed=0)
    plain_state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(plain_state, model_io.unflatten(merged_params))
    nnx.update(plain, plain_state)
    ours, merged = adapted(IDS).last_hidden_state, plain(IDS).last_hidden_state
    np.testing.assert_allclose(np.asarray(merged), np.asarray(ours), atol=2e-5)
    base, _ = models(name)
    assert np.abs(np.asarray(base(IDS).last_hidden_state - ours)).max() > 1e-2


def test_rank_stabilized_scale_and_dropout():
    config = get_preset("llama-tiny", **TINY, lora_rank=16, lora_alpha=8.0, lora_targets=("query",))
    assert lora_lib.lora_scale(config) == 0.5
    assert lora_lib.lora_scale(config.replace(lora_rslora=True)) == 2.0
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        config.replace(lora_dropout=1.0)
    with pytest.raises(ValueError, match="but lora_rank=0: set a rank"):
        config.replace(lora_rank=0)
