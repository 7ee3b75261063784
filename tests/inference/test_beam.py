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
# (model, settings): beam widths, length penalties, the three early_stopping modes, min_new_tokens,
# several returned sequences, one stop token (GPT-2), three (Llama) or none. Settings that differ
# only in length penalty, early stopping, min_new_tokens or the stop tokens' ids share one
# compilation. Cases 3 and 4 give other tokens with early_stopping=False (checked below).
CASES = [
    ("gpt2", dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=2)),
    ("gpt2", dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=2)),
    ("gpt2", dict(num_beams=4, length_penalty=0.0, early_stopping=True, num_return_sequences=2,
                  min_new_tokens=3)),
    ("gpt2", dict(num_beams=4, length_penalty=1.0, early_stopping=True, num_return_sequences=2)),
    ("llama_untied", dict(num_beams=4, length_penalty=1.0, early_stopping=True,
                          num_return_sequences=2)),
    ("llama_untied", dict(num_beams=4, length_penalty=2.0, early_stopping=False,
                          num_return_sequences=2, min_new_tokens=2)),
    ("llama_untied", dict(num_beams=4, length_penalty=0.0, early_stopping="never",
                          num_return_sequences=2)),
    ("gpt2", dict(num_beams=4, length_penalty=1.0, early_stopping=True, num_return_sequences=2,
                  stop=False)),
    ("llama_untied", dict(num_beams=2, length_penalty=0.5, early_stopping="never", stop=False)),
]
# Stop tokens that the models emit within a few steps: GPT-2's greedy token at step 3 of the
# first prompt; Llama's at step 2 of every prompt.
STOPS_AT = {"gpt2": [(0, 3)], "llama_untied": [(0, 2), (1, 2), (2, 2)]}


def transformers_greedy(ref, prompt):
    ref.generation_config.eos_token_id = None  # All N tokens.
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                           max_new_tokens=N, do_sample=False, pad_token_id=PAD)
    return out[0, len(prompt):].numpy()


@pytest.fixture(scope="module")
def models(tiny):
    """name → (our model, the transformers model, transformers' greedy tokens [prompts, N], the
    stop tokens of `STOPS_AT`)."""
    out = {}
    for name in ("gpt2", "llama_untied"):
        ref = tiny(name)[1]
        greedy = np.stack([transformers_greedy(ref, prompt) for prompt in PROMPTS])
        stops = tuple(sorted({int(greedy[at]) for at in STOPS_AT[name]}))
        out[name] = (load_hf_model(tiny(name)[0]), ref, greedy, stops)
    return out


def config_of(settings: dict, stops: tuple[int, ...]) -> BeamConfig:
    settings = dict(settings)
    stops = stops if settings.pop("stop", True) else ()
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
    model, ref, _, stops = models[name]
    config = config_of(settings, stops)
    ours = beam_generate(model, PROMPTS, config)
    theirs, scores = transformers_beam(ref, PROMPTS, config)
    assert ours.sequences() == theirs
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4, rtol=0)
    if config.stop_tokens and config.min_new_tokens:
        assert not any(set(stops) & set(seq[:config.min_new_tokens])
                       for hyps in ours.sequences() for seq in hyps)


def test_the_cases_exercise_stop_tokens_and_early_stopping(models):
    """The cases above are only meaningful if hypotheses end at stop tokens and early stopping
    changes what is found."""
    for name, case in (("gpt2", 3), ("llama_untied", 4)):
        model, _, _, stops = models[name]
        config = config_of(CASES[case][1], stops)
        out = beam_generate(model, PROMPTS, config)
        assert any(seq[-1] in stops for hyps in out.sequences() for seq in hyps)
        assert out.lengths.min() < N
        assert np.all(out.tokens[out.lengths[..., None] <= np.arange(N)] == PAD)
        later = beam_generate(model, PROMPTS, dataclasses.replace(config, early_stopping=False))
        assert later.sequences() != out.sequences()


def test_one_beam_is_greedy(models):
    model, _, greedy, stops = models["llama_untied"]
    beam = beam_generate(model, PROMPTS, BeamConfig(num_beams=1, max_new_tokens=N,
                                                    stop_tokens=stops))
    # Greedy decoding with stop tokens: the greedy tokens up to the first stop token.
    ends = [np.flatnonzero(np.isin(row, stops)) for row in greedy]
    expected = [row[:end[0] + 1 if end.size else N].tolist() for row, end in zip(greedy, ends)]
    assert [hyps[0] for hyps in beam.sequences()] == expected
    assert any(end.size for end in ends)


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
