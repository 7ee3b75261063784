"""Generation with a KV cache: equal to recomputing everything, to transformers, and per prompt."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from transformer.hf import load_hf_model
from transformer.inference import SamplingConfig, generate, left_pad, stream
from transformer.inference.decode import decoding_model
from transformer.sharding import DEFAULT_RULES, make_mesh

N = 8
GREEDY = SamplingConfig(max_new_tokens=N)
PROMPTS = [[5, 17, 33], [9, 4, 61, 22, 8, 40, 11], [70, 3, 19, 44, 2 + 3]]


@pytest.fixture(scope="module")
def models(tiny):
    return {name: (load_hf_model(tiny(name)[0]), tiny(name)[1]) for name in ("gpt2", "llama_untied")}


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def greedy_without_cache(model, prompt, n):
    """Runs the full forward on the whole sequence for every new token (right zeros are unseen)."""
    graphdef, state = nnx.split(model)
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for t in range(n):
        logits = _logits(graphdef, state, buf)
        buf[0, len(prompt) + t] = int(np.argmax(logits[0, len(prompt) + t - 1]))
    return buf[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy(models):
    return {name: generate(model, PROMPTS, GREEDY) for name, (model, _) in models.items()}


@pytest.mark.parametrize("name", ["gpt2", "llama_untied"])
def test_greedy_with_cache_equals_without_cache_and_transformers(models, greedy, name):
    model, ref = models[name]
    ref.generation_config.eos_token_id = None  # Compare all N tokens.
    for prompt, tokens in zip(PROMPTS, greedy[name].sequences()):
        assert tokens == greedy_without_cache(model, prompt, N)
        with torch.no_grad():
            ones = torch.ones(1, len(prompt), dtype=torch.long)
            hf = ref.generate(torch.tensor([prompt]), attention_mask=ones, max_new_tokens=N,
                              do_sample=False, pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama_untied"])
def test_batch_of_different_lengths_equals_each_prompt_alone(models, greedy, name):
    model, _ = models[name]
    for prompt, tokens in zip(PROMPTS, greedy[name].sequences()):
        assert generate(model, [prompt], GREEDY).sequences()[0] == tokens


def test_sliding_window_generation_equals_transformers(tiny):
    folder, ref = tiny("mistral_window")
    model = load_hf_model(folder)
    prompts = [[5, 17, 33, 8, 40, 11], [9, 4]]  # Longer and shorter than the window of 4.
    ours = generate(model, prompts, GREEDY).sequences()
    for prompt, tokens in zip(prompts, ours):
        assert tokens == greedy_without_cache(model, prompt, N)
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


def test_left_pad_layout():
    ids, mask = left_pad([[1, 2], [3, 4, 5]], pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1]])


def test_top_k_1_equals_greedy(models, greedy):
    model, _ = models["llama_untied"]
    config = SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=1)
    out = generate(model, PROMPTS, config, rng=jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, greedy["llama_untied"].tokens)


def test_sampling_varies_with_the_key_and_is_reproducible(models):
    model, _ = models["gpt2"]
    config = SamplingConfig(max_new_tokens=N, temperature=1.5, top_p=0.95)
    a = generate(model, PROMPTS, config, rng=jax.random.key(0)).tokens
    b = generate(model, PROMPTS, config, rng=jax.random.key(0)).tokens
    c = generate(model, PROMPTS, config, rng=jax.random.key(1)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stop_tokens_stop_each_sequence(models, greedy):
    model, _ = models["gpt2"]
    reference = greedy["gpt2"].tokens
    stop = int(reference[0, 2])  # Sequence 0 emits it at step 2 (or earlier).
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=N, stop_tokens=(stop,), pad_id=-1))
    for row, ref_row, n in zip(out.tokens, reference, out.lengths):
        hits = np.flatnonzero(ref_row == stop)
        expected = hits[0] + 1 if hits.size else N
        assert n == expected
        np.testing.assert_array_equal(row[:n], ref_row[:n])
        assert np.all(row[n:] == -1)  # Padding after the stop token.
    assert out.lengths[0] <= 3


def test_stream_equals_generate(models, greedy):
    model, _ = models["llama_untied"]
    assert list(stream(model, PROMPTS[1], GREEDY)) == greedy["llama_untied"].sequences()[1]


def test_sharded_generation_equals_unsharded(tiny, greedy):
    mesh = make_mesh((2, 2, 2))
    model = load_hf_model(tiny("llama_untied")[0], mesh=mesh, rules=DEFAULT_RULES)
    prompts = PROMPTS + [PROMPTS[0]]  # A batch of 4 splits over data x fsdp.
    out = generate(model, prompts, GREEDY, mesh=mesh, rules=DEFAULT_RULES)
    np.testing.assert_array_equal(out.tokens[:3], greedy["llama_untied"].tokens)
    np.testing.assert_array_equal(out.tokens[3], greedy["llama_untied"].tokens[0])


def test_encoder_cannot_generate(tiny):
    model = load_hf_model(tiny("bert_mlm")[0])
    with pytest.raises(ValueError, match="needs a decoder"):
        generate(model, PROMPTS, GREEDY)


def test_decoding_model_is_kept_until_the_weights_change(models):
    model, _ = models["gpt2"]
    first = decoding_model(model)
    assert decoding_model(model) is first
    query = model.layers.blocks.attention.query
    np.testing.assert_array_equal(first.layers.blocks[1].attention.query[...], query[...][1])
    assert first.embeddings.tokens[...] is model.embeddings.tokens[...]  # Shared, not copied.
    original = query[...]
    query[...] = original * 2  # A new array: the decoding model is made again.
    try:
        second = decoding_model(model)
        assert second is not first
        np.testing.assert_array_equal(second.layers.blocks[1].attention.query[...], original[1] * 2)
    finally:
        query[...] = original
