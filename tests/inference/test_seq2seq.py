"""Encoder-decoder generation (a flan-T5-like T5, BART) equals transformers' `generate`: greedy
tokens, beam tokens and `sequences_scores`; cached decoding equals the uncached forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf.tiny_models import make_tiny, untie_t5_head
from transformer.hf import load_hf_model
from transformer.inference import (
    BeamConfig,
    SamplingConfig,
    seq2seq_beam_generate,
    seq2seq_generate,
)
from transformer.inference.decode import decoding_model
from transformer.inference.seq2seq import right_pad

N = 8
INPUTS = [[5, 17, 33, 8, 61, 40, 12], [9, 4, 61, 22, 8, 40, 11, 70, 3, 19, 44, 5], [70, 3, 19]]
PAD = {"t5": 0, "bart": 1}
# Beam settings per model: the three early_stopping modes, length penalties, min_new_tokens,
# several returned sequences. Those that differ only in scoring settings share a compilation.
CASES = [
    ("t5", dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=2)),
    ("t5", dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=2)),
    ("t5", dict(num_beams=4, length_penalty=0.0, early_stopping=True, num_return_sequences=2,
                min_new_tokens=3)),
    ("bart", dict(num_beams=3, length_penalty=1.0, early_stopping=True, num_return_sequences=3)),
    ("bart", dict(num_beams=3, length_penalty=0.5, early_stopping=False, num_return_sequences=3)),
]


def hf_inputs(name):
    ids, mask = right_pad(INPUTS, PAD[name])
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)


def hf_generate(hf, name, stops, **settings):
    ids, mask = hf_inputs(name)
    hf.generation_config.eos_token_id = list(stops) or None
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                           pad_token_id=PAD[name], forced_eos_token_id=None,
                           forced_bos_token_id=None, **settings)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → (our model, the transformers model, stop tokens): the stop tokens are tokens that
    transformers' greedy decoding emits within a few steps, so that hypotheses end early."""
    root = tmp_path_factory.mktemp("seq2seq_generate")
    out = {}
    for name in PAD:
        folder, hf = make_tiny(f"{name}_sharp", root)
        if name == "t5":
            folder = untie_t5_head(hf, root / "t5_untied")
        greedy = hf_generate(hf, name, ())[:, 1:].numpy()
        stops = tuple(sorted({int(greedy[0, 2]), int(greedy[2, 4])}))
        out[name] = (load_hf_model(folder), hf, stops)
    return out


@pytest.mark.parametrize("name", list(PAD))
def test_greedy_matches_transformers_on_a_ragged_batch(models, name):
    ours, hf, stops = models[name]
    want = hf_generate(hf, name, stops)[:, 1:].numpy()
    got = seq2seq_generate(ours, INPUTS, SamplingConfig(max_new_tokens=N, stop_tokens=stops,
                                                        pad_id=PAD[name]))
    assert (got.lengths < N).any()  # Some sequence stopped early.
    for row, (tokens, n) in enumerate(zip(got.tokens, got.lengths)):
        np.testing.assert_array_equal(tokens[:n], want[row, :n])
    # The inputs decide the targets: they differ from row to row.
    assert len({tuple(row) for row in want}) == len(INPUTS)


@functools.partial(jax.jit, static_argnums=0)
def _cached_and_uncached(graphdef, state, ids, mask, targets):
    model = nnx.merge(graphdef, state)
    full = model(ids, targets, attention_mask=mask).logits
    encoded = model.encode(ids, attention_mask=mask)
    batch, length = targets.shape
    cache = model.init_cache(batch, length, encoded, mask)

    def step(carry, i):  # One token at a time through the cache.
        cache, slots = carry
        slots = jax.lax.dynamic_update_slice(slots, jnp.ones((batch, 1), jnp.int32), (0, i))
        token = jax.lax.dynamic_slice_in_dim(targets, i, 1, axis=1)
        out = model.decode(token, None, mask, cache=cache, cache_index=i, cache_segment_ids=slots)
        return (out.cache, slots), out.logits[:, 0]

    slots = jnp.zeros((batch, length), jnp.int32)
    _, stepped = jax.lax.scan(step, (cache, slots), jnp.arange(length))
    return full, stepped.swapaxes(0, 1)


def test_cached_decoding_equals_uncached(models):
    """T5's relative bias read from cache positions (BART's cached positions are checked by its
    greedy and beam tokens against transformers')."""
    name = "t5"
    ours, _, _ = models[name]
    ids, mask = right_pad(INPUTS, PAD[name])
    targets = np.random.default_rng(0).integers(3, 90, (len(INPUTS), N)).astype(np.int32)
    targets[:, 0] = ours.config.decoder_start_token_id
    graphdef, state = nnx.split(decoding_model(ours))  # The layer list that generation uses.
    full, stepped = _cached_and_uncached(graphdef, state, ids, mask, targets)
    # Float32 rounding of logits up to ~20 in size.
    assert np.abs(np.asarray(full - stepped)).max() <= 1e-4


@pytest.mark.parametrize("name,settings", CASES)
def test_beam_search_matches_transformers(models, name, settings):
    ours, hf, stops = models[name]
    config = BeamConfig(max_new_tokens=N, stop_tokens=stops, pad_id=PAD[name], **settings)
    out = hf_generate(hf, name, stops, num_beams=config.num_beams,
                      length_penalty=config.length_penalty, early_stopping=config.early_stopping,
                      min_new_tokens=config.min_new_tokens,
                      num_return_sequences=config.num_return_sequences, output_scores=True,
                      return_dict_in_generate=True)
    n = config.num_return_sequences
    want_lengths = (out.beam_indices >= 0).sum(1).numpy().reshape(len(INPUTS), n)
    want_tokens = out.sequences[:, 1:].numpy().reshape(len(INPUTS), n, -1)
    want_scores = out.sequences_scores.numpy().reshape(len(INPUTS), n)
    got = seq2seq_beam_generate(ours, INPUTS, config)
    np.testing.assert_array_equal(got.lengths, want_lengths)
    for i in range(len(INPUTS)):
        for j in range(n):
            np.testing.assert_array_equal(got.tokens[i, j, :got.lengths[i, j]],
                                          want_tokens[i, j, :want_lengths[i, j]])
    assert np.abs(got.scores - want_scores).max() <= 1e-4
    if config.length_penalty <= 1.0:  # (A penalty of 2 favours the long ones.)
        assert (got.lengths < N).any()  # Stop tokens ended some hypotheses.


def test_generate_cli_input_ids_and_flags(fixtures):
    from transformer.data.tokenizer import load_tokenizer
    from transformer.generate import _check_text_flags, input_ids

    # Mistral's SentencePiece model: adds BOS, not EOS, by itself.
    tokenizer = load_tokenizer(fixtures / "tokenizers" / "mistral_sp32000.model")
    ids = input_ids(tokenizer, "The cat sat on the mat.")
    assert ids[:-1] == tokenizer("The cat sat on the mat.", padding=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_id
    with pytest.raises(ValueError, match="encoder-decoder: give the text to transform as --input"):
        _check_text_flags("ckpt", True, "a prompt", None, False)
    with pytest.raises(ValueError, match="is a decoder: give the text to continue as --prompt"):
        _check_text_flags("ckpt", False, None, "an input", False)


def test_bad_generation_requests_are_refused(models):
    ours = models["bart"][0]
    with pytest.raises(ValueError, match="every input needs at least one token"):
        seq2seq_generate(ours, [[5, 6], []])
    with pytest.raises(ValueError, match="beyond the model's max_length 64"):
        seq2seq_generate(ours, [[5] * 65])
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        BeamConfig(num_beams=0)
    with pytest.raises(ValueError, match="generate from inputs with"):
        from transformer.inference import generate
        generate(ours, [[5, 6]])
