"""Beam search equals transformers' `generate(num_beams=...)`: tokens and `sequences_scores`."""

import dataclasses

import numpy as np
import pytest
import torch

from transformer.hf import load_hf_model
from transformer.inference import left_pad
from transformer.inference.beam import BeamConfig, beam_generate
from transformer.sharding import DEFAULT_RULES, make_mesh

N = 8
PAD = 0
PROMPTS = [[5, 17, 33], [9, 4, 61, 22, 8, 40, 11], [70, 3, 19, 44, 5]]  # Ragged: left-padded.
EOS = "eos"  # Stands for a stop token the model emits early (chosen from its greedy output).
# (model, settings): beam widths, length penalties, the three early_stopping modes, min_new_tokens,
# several returned sequences, with and without a stop token.
# (model, settings): beam widths, length penalties, the three early_stopping modes, min_new_tokens,
# several returned sequences, with and without a stop token. Settings that differ only in length
# penalty, early stopping, min_new_tokens or the stop token (one or none) share one compilation.
CASES = [
    ("gpt2", dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=2)),
    ("gpt2", dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=2)),
    ("gpt2", dict(num_beams=4, length_penalty=0.0, early_stopping=True, num_return_sequences=2,
                  min_new_tokens=3)),
    ("gpt2", dict(num_beams=4, length_penalty=1.0, early_stopping=True, num_return_sequences=2,
                  stop=False)),
    ("llama_untied", dict(num_beams=4, length_penalty=1.0, early_stopping=True,
                          num_return_sequences=2)),
    ("llama_untied", dict(num_beams=4, length_penalty=2.0, early_stopping=False,
                          num_return_sequences=2, min_new_tokens=2)),
    ("llama_untied", dict(num_beams=4, length_penalty=0.0, early_stopping="never",
                          num_return_sequences=2)),
    ("llama_untied", dict(num_beams=2, length_penalty=0.5, early_stopping="never")),
    ("llama_untied", dict(num_beams=2, length_penalty=1.0, early_stopping=False, stop=False)),
]


def transformers_greedy(ref, prompt):
    ref.generation_config.eos_token_id = None  # All N tokens.
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                           max_new_tokens=N, do_sample=False, pad_token_id=PAD)
    return out[0, len(prompt):].numpy()


@pytest.fixture(scope="module")
def models(tiny):
    """name → (our model, the transformers model, transformers' greedy tokens [prompts, N], a stop
    token the model emits within a few steps)."""
    out = {}
    for name in ("gpt2", "llama_untied"):
        ref = tiny(name)[1]
        greedy = np.stack([transformers_greedy(ref, prompt) for prompt in PROMPTS])
        out[name] = (load_hf_model(tiny(name)[0]), ref, greedy, int(greedy[0, 2]))
    return out


def config_of(settings: dict, stop: int) -> BeamConfig:
    settings = dict(settings)
    stops = (stop,) if settings.pop("stop", True) else ()
    return BeamConfig(max_new_tokens=N, stop_tokens=stops, pad_id=PAD, **settings)


def transformers_beam(ref, prompts, config: BeamConfig):
    """transformers' hypotheses per input (token lists) and their `sequences_scores`."""
    ids, mask = left_pad(prompts, PAD)
    ref.generation_config.eos_token_id = list(config.stop_tokens) or None
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), do_sample=False,
            num_beams=config.num_beams, length_penalty=config.length_penalty,
            early_stopping=config.early_stopping, max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens, num_return_sequences=config.num_return_sequences,
            pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    lengths = (out.beam_indices >= 0).sum(1).numpy()  # New tokens of each hypothesis.
    new = out.sequences[:, ids.shape[1]:].numpy()
    n = config.num_return_sequences
    sequences = [row[:k].tolist() for row, k in zip(new, lengths)]
    return ([sequences[i * n:(i + 1) * n] for i in range(len(prompts))],
            out.sequences_scores.numpy().reshape(len(prompts), n))


@pytest.mark.parametrize("name,settings", CASES)
def test_beam_search_equals_transformers(models, name, settings):
    model, ref, _, stop = models[name]
    config = config_of(settings, stop)
    ours = beam_generate(model, PROMPTS, config)
    theirs, scores = transformers_beam(ref, PROMPTS, config)
    assert ours.sequences() == theirs
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4, rtol=0)
    if config.stop_tokens and config.min_new_tokens:
        assert all(stop not in seq[:config.min_new_tokens - 1]
                   for hyps in ours.sequences() for seq in hyps)


def test_the_stop_token_ends_hypotheses(models):
    """The cases above are only meaningful if some hypotheses do end at the stop token."""
    model, _, _, stop = models["gpt2"]
    out = beam_generate(model, PROMPTS, config_of(CASES[0][1], stop))
    ended = [seq[-1] == stop for hyps in out.sequences() for seq in hyps]
    assert any(ended) and out.lengths.min() < N
    ends = out.lengths[..., None] <= np.arange(N)
    assert np.all(out.tokens[ends] == PAD)


def test_one_beam_is_greedy(models):
    model, _, greedy, stop = models["llama_untied"]
    beam = beam_generate(model, PROMPTS, BeamConfig(num_beams=1, max_new_tokens=N,
                                                    stop_tokens=(stop,)))
    # Greedy decoding with a stop token: the greedy tokens up to the first stop token.
    expected = [row[:(np.flatnonzero(row == stop)[:1] + 1).tolist()[0] if stop in row else N]
                for row in greedy]
    assert [hyps[0] for hyps in beam.sequences()] == [row.tolist() for row in expected]
    assert any(stop in row for row in greedy)


def test_sharded_beam_search_equals_unsharded(tiny, models):
    mesh = make_mesh((2, 2, 2))
    model = load_hf_model(tiny("llama_untied")[0], mesh=mesh, rules=DEFAULT_RULES)
    config = config_of(CASES[4][1], models["llama_untied"][3])
    prompts = PROMPTS + [PROMPTS[0]]  # 4 inputs x 4 beams split over data x fsdp.
    out = beam_generate(model, prompts, config, mesh=mesh, rules=DEFAULT_RULES)
    alone = beam_generate(models["llama_untied"][0], PROMPTS, config)
    assert out.sequences()[:3] == alone.sequences()
    assert out.sequences()[3] == alone.sequences()[0]
    np.testing.assert_allclose(out.scores[:3], alone.scores, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(num_beams=0), "num_beams must be at least 1"),
    (dict(num_return_sequences=3, num_beams=2), "num_return_sequences must be in"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
    (dict(min_new_tokens=N + 1), "min_new_tokens must be in"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BeamConfig(max_new_tokens=N), **change)


def test_beams_that_do_not_fit_are_refused(models):
    model = models["gpt2"][0]  # 64 learned positions, a vocabulary of 96.
    with pytest.raises(ValueError, match="exceeds the model's max_length 64"):
        beam_generate(model, PROMPTS, BeamConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match="only num_beams x vocab_size = 96"):
        beam_generate(model, PROMPTS, BeamConfig(num_beams=1, stop_tokens=tuple(range(96))))
