"""The seq2seq objective: the packed loss equals each example alone; the evaluator's cached
greedy decoding equals an uncached argmax loop over the full model; the :ci recipes end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.test_recipes import load
from tests.train.test_main import REPO, assert_ok, env
from transformer.data import seq2seq
from transformer.models import MODELS, ModelConfig, count_params, get_preset
from transformer.train import objectives, seq2seq_eval

START, EOS = 0, 1


def main(args):
    """`transformer.main` in a fresh process on one CPU device: these tests are about the recipes
    end to end (sharded steps equal one device in tests/train/test_steps.py), and compiling for
    one device takes a third of the time of eight."""
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return subprocess.run([sys.executable, "-m", "transformer.main", *map(str, args)], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model():
    config = get_preset("t5-tiny", dropout_rate=0.0, vocab_size=64)
    return MODELS["encoder_decoder"](config, rngs=nnx.Rngs(0))


def examples(seed=0, count=5):
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(2, 64, int(rng.integers(3, 9))).astype(np.int32),
             "targets": rng.integers(2, 64, int(rng.integers(2, 7))).astype(np.int32)}
            for _ in range(count)]


def test_packed_loss_equals_each_example_alone(model):
    config = ml_collections.ConfigDict({"label_smoothing": 0.0, "z_loss": 0.0})
    graphdef, params = nnx.split(model)
    objective = objectives.get_objective("seq2seq")
    loss = jax.jit(lambda p, b: objective.loss(nnx.merge(graphdef, p), b, None, config))
    pairs = examples()
    packed = seq2seq.teacher_forcing(seq2seq.pack_row(pairs, 40, 30), START)
    packed_sums = loss(params, {k: v[None] for k, v in packed.items()})
    alone = [loss(params, {k: v[None] for k, v in seq2seq.teacher_forcing(
        seq2seq.pack_row([p], 12, 9), START).items()}) for p in pairs]
    assert float(packed_sums["weight_sum"]) == sum(len(p["targets"]) for p in pairs)
    for key in ("loss_sum", "correct_sum", "weight_sum"):
        np.testing.assert_allclose(float(packed_sums[key]), sum(float(a[key]) for a in alone),
                                   rtol=1e-5)


def test_cached_greedy_equals_the_uncached_argmax_loop(model):
    pairs = examples(seed=1, count=3)
    width = max(len(p["inputs"]) for p in pairs)
    inputs = np.zeros((3, width), np.int32)
    for i, p in enumerate(pairs):
        inputs[i, : len(p["inputs"])] = p["inputs"]
    segments = (inputs > 0).astype(np.int32)
    steps = 8
    graphdef, params = nnx.split(model)
    generate = jax.jit(seq2seq_eval.make_greedy(graphdef, steps, START, EOS, pad_id=0))
    cached = np.asarray(generate(params, jnp.asarray(inputs), jnp.asarray(segments)))
    # The reference: the whole decoder prefix through the model (no cache) at every step; the
    # decoder is causal, so position t of a fixed-width prefix sees only tokens 0..t.
    full = jax.jit(lambda p, src, seg, dec: nnx.merge(graphdef, p)(
        src, dec, segment_ids=seg).logits)
    prefix = np.zeros((3, steps), np.int32)
    prefix[:, 0] = START
    done = np.zeros(3, bool)
    reference = np.zeros((3, steps), np.int32)
    for t in range(steps):
        token = np.asarray(jnp.argmax(full(params, inputs, segments, prefix)[:, t], -1))
        token = np.where(done, 0, token)
        reference[:, t] = token
        done |= token == EOS
        if t + 1 < steps:
            prefix[:, t + 1] = token
    np.testing.assert_array_equal(cached, reference)


@pytest.mark.parametrize("recipe, metric", [("translation", "eval_bleu"),
                                            ("summarization", "eval_rougeL")])
def test_ci_recipe_trains_and_scores_generations(tmp_path, recipe, metric):
    workdir = tmp_path / recipe
    result = main([f"--config=configs/{recipe}.py:ci", f"--workdir={workdir}",
                   f"--config.data.cache_dir={tmp_path / 'cache'}"])
    assert_ok(result)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert metric in final and 0.0 <= final[metric] <= 100.0
    sample = {"translation": 40, "summarization": 20}[recipe]
    assert final["eval_examples"] == sample  # Every example of the split, once.
    predictions = (workdir / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == sample
    assert all(r["loss"] > 0 for r in rows if "loss" in r)


def test_t5_pretrain_ci_recipe_trains_by_span_corruption(tmp_path):
    workdir = tmp_path / "t5"
    assert_ok(main(["--config=configs/t5_pretrain.py:ci", f"--workdir={workdir}",
                    f"--config.data.cache_dir={tmp_path / 'cache'}"]))
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # Targets are ~15 % of the tokens plus a sentinel per span and EOS: far fewer than inputs.
    assert all(0 < r["tokens"] < 8 * 32 for r in train)
    assert np.isfinite(rows[-1]["eval_loss"]) and rows[-1]["eval_tokens"] > 0


@pytest.mark.parametrize("recipe, variants", [
    ("translation", ["de_en", "en_de", "ci"]), ("summarization", ["debian", "finetune", "ci"]),
    ("t5_pretrain", ["tiny", "small", "base", "ci"])])
def test_recipe_variants_build_encoder_decoder_configs(recipe, variants):
    module = load(recipe)
    assert f"python -m transformer.main --config=configs/{recipe}.py" in module.__doc__
    for variant in variants:
        config = module.get_config(variant)
        model = ModelConfig.from_dict(config.model.to_dict())
        assert model.architecture == "encoder_decoder"
        assert config.objective in objectives.OBJECTIVES
        if variant in ("small", "base"):  # T5 v1.1 small/base: 77M and 248M parameters.
            published = {"small": 77e6, "base": 248e6}[variant]
            assert abs(count_params(model) - published) / published < 0.01
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")
