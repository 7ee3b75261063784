"""Our checkpoint format, from_pretrained on it, and the convert command line."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.hf.tiny_models import MINILM_DIR, random_ids
from transformer import model_io
from transformer.convert import export_checkpoint, import_hf
from transformer.inference.features import read_pooling
from transformer.models import build_model, get_preset
from transformer.pretrained import from_pretrained

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=64)


def test_save_and_load_round_trip(tmp_path, fixtures):
    model = build_model(get_preset("gpt2-tiny", **TINY), seed=4)
    (tmp_path / "tok").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(fixtures / "tokenizers" / name, tmp_path / "tok" / name)
    model_io.save_model(tmp_path / "m", model, tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "m" / "tokenizer" / "encoder.json").is_file()
    loaded = model_io.load_model(tmp_path / "m")
    assert loaded.config == model.config
    ids = random_ids(2, 8)
    np.testing.assert_array_equal(loaded(ids).logits, model(ids).logits)
    tokenizer, again = from_pretrained(tmp_path / "m")
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"
    np.testing.assert_array_equal(again(ids).logits, model(ids).logits)


def test_load_params_into_a_model_and_a_state(tmp_path):
    config = get_preset("llama-tiny", **TINY, num_kv_heads=2)
    model_io.save_model(tmp_path / "m", build_model(config, seed=1))
    target = model_io.load_params_into(build_model(config, seed=2), tmp_path / "m")
    np.testing.assert_array_equal(target.lm_head[...], build_model(config, seed=1).lm_head[...])
    state = model_io.load_params_into(nnx.state(build_model(config, seed=3), nnx.Param), tmp_path / "m")
    np.testing.assert_array_equal(state["lm_head"][...], target.lm_head[...])


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    model_io.save_model(tmp_path / "m", build_model(get_preset("gpt2-tiny", **TINY)))
    other = build_model(get_preset("gpt2-tiny", **{**TINY, "mlp_dim": 48}))
    with pytest.raises(ValueError) as error:
        model_io.load_params_into(other, tmp_path / "m")
    message = str(error.value)
    assert "layers.blocks.mlp.wi: checkpoint (2, 32, 64) vs model (2, 32, 48)" in message
    assert "layers.blocks.mlp.wo: checkpoint (2, 64, 32) vs model (2, 48, 32)" in message


def test_convert_import_then_export_in_process(tmp_path):
    ckpt = import_hf(MINILM_DIR, tmp_path / "ckpt")
    assert read_pooling(ckpt).normalize and (ckpt / "tokenizer" / "vocab.txt").is_file()
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer, model = from_pretrained(ckpt)
    assert model.config.hidden_size == 384 and tokenizer.cls_id == 101


def test_convert_command_line(tiny, tmp_path):
    folder, _ = tiny("llama_tied")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    run = lambda *args: subprocess.run([sys.executable, "-m", "transformer.convert", *args],
                                       capture_output=True, text=True, env=env, timeout=120)
    done = run("import", f"--hf_dir={folder}", f"--output={tmp_path / 'ckpt'}")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("export", f"--checkpoint={tmp_path / 'ckpt'}", f"--output={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    done = run("import", "--output=x")
    assert done.returncode != 0 and "needs --hf_dir" in done.stderr


def test_load_params_for_the_trainer_restores_sharded_pure_dicts(tmp_path):
    import jax

    from transformer.sharding import DEFAULT_RULES, make_mesh, state_shardings

    config = get_preset("llama-tiny", **TINY, num_kv_heads=2)
    model = build_model(config, seed=1)
    model_io.save_model(tmp_path / "m", model)
    mesh = make_mesh((2, 2, 2))
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(config)), nnx.Param)
    shapes = nnx.to_pure_dict(abstract)
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh, DEFAULT_RULES))
    params = model_io.load_params(tmp_path / "m", shapes, shardings)
    query = params["layers"]["blocks"]["attention"]["query"]
    assert query.sharding == shardings["layers"]["blocks"]["attention"]["query"]
    np.testing.assert_array_equal(query, model.layers.blocks.attention.query[...])
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
