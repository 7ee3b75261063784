"""Our models exported as Hugging Face folders load in transformers and give the same outputs."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.hf.tiny_models import MINILM_DIR, random_ids, torch_forward
from transformer import model_io
from transformer.hf import export_hf, load_hf_model
from transformer.models import build_model, get_preset

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=64)
MODELS = {
    "bert": (get_preset("bert-tiny", **TINY), transformers.AutoModelForMaskedLM),
    "gpt2": (get_preset("gpt2-tiny", **TINY), transformers.AutoModelForCausalLM),
    "llama": (get_preset("llama-tiny", **TINY, num_kv_heads=2, rope_base=1000.0),
              transformers.AutoModelForCausalLM),
    "llama_tied_llama3": (get_preset("llama-tiny", **TINY, num_kv_heads=1, tie_embeddings=True,
                                     rope_scaling="llama3", rope_factor=4.0,
                                     rope_original_max_length=16), transformers.AutoModelForCausalLM),
    "mistral_window": (get_preset("llama-tiny", **TINY, num_kv_heads=2, sliding_window=4),
                       transformers.AutoModelForCausalLM),
}


def randomize(model, seed=0):
    """Random values for every parameter (norm scales and biases too)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape) + (x == 1) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers_with_same_outputs(tmp_path, name):
    config, auto = MODELS[name]
    model = randomize(build_model(config, seed=1))
    folder = export_hf(model, tmp_path / name)
    ref = auto.from_pretrained(folder).eval()
    ids = random_ids(2, 10, seed=3)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours = model(ids, mask)
    out = torch_forward(ref, ids, mask, output_hidden_states=True)
    m = mask[..., None]
    assert np.abs((np.asarray(ours.logits) - out.logits.numpy()) * m).max() < 1e-4
    base = transformers.AutoModel.from_pretrained(folder).eval()  # The bare model loads too.
    hidden = torch_forward(base, ids, mask).last_hidden_state.numpy()
    assert np.abs((np.asarray(ours.last_hidden_state) - hidden) * m).max() < 1e-4
    # And importing the folder gives back the same parameters.
    again = load_hf_model(folder)
    ours_params = model_io.flat_params(nnx.state(model, nnx.Param))
    for path, value in model_io.flat_params(nnx.state(again, nnx.Param)).items():
        np.testing.assert_array_equal(value, ours_params[path], err_msg=path)


def test_minilm_export_round_trip(tmp_path):
    model = load_hf_model(MINILM_DIR)
    folder = export_hf(model, tmp_path / "minilm", tokenizer_dir=MINILM_DIR)
    assert (folder / "tokenizer.json").is_file() and (folder / "vocab.txt").is_file()
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tok(["An exported model.", "Same numbers?"], return_tensors="np", padding=True)
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in inputs.items()})
    ours = model(**{k: np.asarray(v, np.int32) for k, v in inputs.items()})
    m = inputs["attention_mask"][..., None]
    assert np.abs((np.asarray(ours.last_hidden_state) - out.last_hidden_state.numpy()) * m).max() < 1e-4
    assert np.abs(np.asarray(ours.pooler_output) - out.pooler_output.numpy()).max() < 1e-4


def test_export_refuses_a_model_without_hf_equivalent(tmp_path):
    config = get_preset("gpt2-tiny", **TINY, norm="rmsnorm")
    with pytest.raises(ValueError, match=r"GPT-2: norm='rmsnorm' \(needs 'layernorm'\)"):
        export_hf(build_model(config), tmp_path / "x")
