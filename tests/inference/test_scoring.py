"""Scoring: per-token log-probabilities equal transformers'; perplexity = exp(mean NLL); the CLIs."""

import io
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.hf.tiny_models import random_ids, torch_forward
from transformer import model_io
from transformer.generate import beam_config, beam_texts, prompt_ids, sampling_config, stream_text
from transformer.hf import load_hf_model
from transformer.inference import beam_generate, mean_pool, perplexity, score_texts, token_logprobs
from transformer.models import build_model, get_preset
from transformer.pretrained import from_pretrained
from transformer.score import report


@pytest.mark.parametrize("name", ["gpt2", "llama3_rope"])
def test_token_logprobs_equal_transformers(tiny, name):
    folder, ref = tiny(name)
    model = load_hf_model(folder)
    ids = random_ids(2, 12, seed=5)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ours = token_logprobs(model, ids, mask)
    logits = torch_forward(ref, ids, mask).logits
    theirs = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]).long())
    theirs = theirs[..., 0].numpy() * mask[:, 1:]
    assert np.abs(ours - theirs).max() < 1e-4
    nll = -theirs.sum() / mask[:, 1:].sum()
    assert perplexity(ours, mask[:, 1:]) == pytest.approx(math.exp(nll), rel=1e-5)


def test_mean_pool_ignores_padding():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask), [[2, 3], [6, 7]])


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, fixtures):
    """A tiny GPT-2 with the real GPT-2 vocabulary and tokenizer, in our checkpoint format."""
    config = get_preset("gpt2-tiny", hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                        max_length=128)
    root = tmp_path_factory.mktemp("ckpt")
    (root / "tok").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(fixtures / "tokenizers" / name, root / "tok" / name)
    path = root / "gpt2"
    model_io.save_model(path, build_model(config, seed=0), tokenizer_dir=root / "tok")
    return path


def test_score_texts_and_report(gpt2_checkpoint):
    tokenizer, model = from_pretrained(gpt2_checkpoint)
    texts = ["The cat sat on the mat.", "Hello"]
    scores = score_texts(tokenizer, model, texts)
    ids = tokenizer(texts[0], padding=False)["input_ids"]
    assert scores[0].tokens == ids and scores[0].num_scored == len(ids) - 1
    direct = token_logprobs(model, np.asarray([ids]))[0]
    np.testing.assert_allclose(scores[0].logprobs, direct, atol=1e-5)
    assert scores[0].perplexity == pytest.approx(math.exp(-np.mean(direct)), rel=1e-5)
    assert scores[1].num_scored == 0  # One token: nothing to predict it from.
    out = io.StringIO()
    ppl = report(tokenizer, scores, per_token=True, out=out)
    assert ppl == pytest.approx(scores[0].perplexity, rel=1e-6)
    assert "'Ġcat'" in out.getvalue()  # The vocabulary string of " cat".


def test_stream_text_prints_the_continuation(gpt2_checkpoint):
    tokenizer, model = from_pretrained(gpt2_checkpoint)
    config = sampling_config(tokenizer, max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0,
                             stop_ids=None)
    assert config.stop_tokens == (50256,)
    out = io.StringIO()
    text = stream_text(tokenizer, model, "Once upon a time", config, out=out)
    assert out.getvalue() == text + "\n"


def test_beam_texts_print_the_best_continuations(gpt2_checkpoint):
    tokenizer, model = from_pretrained(gpt2_checkpoint)
    config = beam_config(tokenizer, num_beams=3, max_new_tokens=5, early_stopping="Never",
                         num_return_sequences=2)
    assert (config.early_stopping, config.stop_tokens, config.num_beams) == ("never", (50256,), 3)
    ids = prompt_ids(tokenizer, "Once upon a time")
    out = io.StringIO()
    texts = beam_texts(tokenizer, model, ids, config, out=out)
    found = beam_generate(model, [ids], config)
    assert texts == [(tokenizer.decode([i for i in seq if i != 50256]), pytest.approx(score))
                     for seq, score in zip(found.sequences()[0], found.scores[0])]
    assert out.getvalue().count("score=") == 2
    with pytest.raises(ValueError, match="--early_stopping must be one of"):
        beam_config(tokenizer, num_beams=2, max_new_tokens=5, early_stopping="maybe")


def test_command_lines(gpt2_checkpoint, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = lambda module, *args: subprocess.run(
        [sys.executable, "-m", module, f"--checkpoint={gpt2_checkpoint}", *args],
        capture_output=True, text=True, env=env, timeout=120)
    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\nA second line of text.\n")
    done = run("transformer.score", f"--file={texts}", "--text=One more.")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("perplexity=") == 4  # Three texts and the total.
    done = run("transformer.generate", "--prompt=Once upon a time", "--max_new_tokens=5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("Once upon a time")
