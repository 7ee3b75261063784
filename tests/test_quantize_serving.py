"""Quantized weights beyond one device and per-channel scales: int8 in groups (MiniLM's features
in groups: tests/test_quantize.py), layers quantize cannot handle are refused, and the sharded
quantized forward pass that `transformer.aot --inference` compiles computes what the model on one
device computes, holding a quarter of the float32 weight bytes per device."""

import jax
import numpy as np
import pytest
from flax import nnx

from transformer import aot
from transformer.aot_memory import per_device_bytes
from transformer.models import build_model, get_preset
from transformer.quantize import (
    QuantizedParam,
    load_quantized,
    quantize,
    quantize_array,
    save_quantized,
)

SMALL = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
             max_length=16, dropout_rate=0.0, attention_dropout_rate=0.0)


def test_int8_groups_share_a_scale_per_group():
    w = jax.random.normal(jax.random.key(0), (256, 24)) * np.linspace(0.1, 3, 256)[:, None]
    q = quantize_array(w, "int8", (-2,), group_size=128)
    assert q["scale"].shape == (2, 24)
    scale = np.repeat(np.asarray(q["scale"]), 128, axis=0)  # One scale for each 128 inputs.
    error = np.abs(np.asarray(q["qvalue"], np.float32) * scale - np.asarray(w))
    assert np.all(error <= 0.5 * scale * (1 + 1e-4)) and error.max() > 0
    for g in range(2):  # Each group's absmax maps to ±127 on its own.
        block = np.asarray(w)[g * 128:(g + 1) * 128]
        np.testing.assert_allclose(np.asarray(q["scale"])[g], np.abs(block).max(0) / 127,
                                   rtol=1e-2)


@pytest.mark.parametrize("preset, changes, holder", [
    ("mixtral-tiny", {}, "MoEMLP.wi"),
    ("gpt2-tiny", dict(lora_rank=2, lora_targets=("query",)), "LoRA.a"),
])
def test_layers_that_would_stay_float_are_refused(preset, changes, holder):
    model = build_model(get_preset(preset, vocab_size=64, max_length=16, **changes), seed=0)
    with pytest.raises(ValueError, match=rf"does not support the layers holding .*{holder}"):
        quantize(model, "int8")


def test_an_encoder_decoder_keeps_its_position_tables_float():
    model = build_model(get_preset("t5-tiny", vocab_size=64, max_length=16), seed=0)
    qmodel = quantize(model, "int8")
    assert isinstance(qmodel.encoder.layers.blocks.attention.query, QuantizedParam)
    assert not isinstance(qmodel.encoder.relative_bias, QuantizedParam)
    np.testing.assert_array_equal(qmodel.encoder.relative_bias[...], model.encoder.relative_bias[...])


def test_bad_group_size_is_refused():
    model = build_model(get_preset("gpt2-tiny", **SMALL), seed=0)
    with pytest.raises(ValueError, match="group_size=0: give a positive number"):
        quantize(model, "int8", group_size=0)


def test_group_size_survives_save_and_load(tmp_path):
    model = quantize(build_model(get_preset("gpt2-tiny", **SMALL), seed=0), "int8", group_size=32)
    save_quantized(tmp_path / "q", model)
    loaded = load_quantized(tmp_path / "q")
    wi = loaded.layers.blocks.mlp.wi.get_value()
    assert wi["scale"].shape == (2, 64 // 32, 128)
    ids = np.arange(16, dtype=np.int32)[None] % 128
    np.testing.assert_array_equal(np.asarray(loaded(ids).logits), np.asarray(model(ids).logits))


@pytest.fixture(scope="module")
def lowered():
    """`transformer.aot`'s inference program for a small decoder on the 8 CPU devices, fsdp 8:
    float32 and int8 weights."""
    config = aot.preset_config("gpt2-tiny")
    config.model.update(SMALL, dtype="float32", remat_policy="none")
    config.data.global_batch_size, config.data.max_length = 8, 16
    return config, {q: aot.lower_forward(config, jax.devices(), q) for q in (None, "int8")}


def test_sharded_quantized_forward_equals_one_device(lowered):
    _, programs = lowered
    model = build_model(get_preset("gpt2-tiny", **{**SMALL, "dtype": "float32"}), seed=3)
    ids = np.random.default_rng(0).integers(0, 128, (8, 16)).astype(np.int32)
    for mode, (program, _, weights, inputs) in programs.items():
        reference = model if mode is None else quantize(model, mode)
        want = np.asarray(reference(ids).logits[:, -1:])
        values = nnx.state(reference, nnx.Param)
        shardings = jax.tree.map(lambda x: x.sharding, weights)
        placed = jax.device_put(values, shardings)
        got = program.compile()(placed, jax.device_put(ids, inputs.sharding))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
        # What one device holds, counted from the placed arrays themselves.
        held = sum(shard.data.nbytes for leaf in jax.tree.leaves(placed)
                   for shard in leaf.addressable_shards if shard.device == jax.devices()[0])
        assert per_device_bytes(weights) == held
    ratio = per_device_bytes(programs[None][2]) / per_device_bytes(programs["int8"][2])
    # int8 values, plus float32 scales, norms and biases: a large share of a model this small.
    assert 2.5 < ratio < 4.0, ratio


def test_the_cli_refuses_quantize_without_inference(capsys):
    with pytest.raises(SystemExit):
        aot.main(["--preset=gpt2-tiny", "--topology=v5e:2x2", "--quantize=int8"])
    assert "add --inference" in capsys.readouterr().err


