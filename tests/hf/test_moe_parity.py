"""Mixtral and Qwen2-MoE: imported from both expert layouts, our logits and load-balancing loss
are those of transformers on a padded batch; exported folders load in transformers with the same
logits; greedy generation with our KV cache gives transformers' tokens."""

import functools
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

from tests.hf.test_import_parity import TOL, masked_max_diff, padded_batch
from tests.hf.tiny_models import torch_forward
from transformer.hf import export_hf, load_hf_model
from transformer.inference import SamplingConfig, generate
from transformer.models import moe

FAMILIES = ["mixtral", "qwen2_moe", "qwen2_moe_step2"]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    out = nnx.merge(graphdef, state)(ids, mask)
    return out.logits, moe.load_balancing_loss(out.router_stats)


def logits_and_aux_loss(model, ids, mask):
    return [np.asarray(x) for x in _forward(*nnx.split(model), ids, mask)]


def fused_folder(folder, ref, out):
    """The same model in transformers 5's in-memory layout (`experts.gate_up_proj` ...)."""
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"
             or not ref.config.tie_word_embeddings}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    safetensors.torch.save_file(state, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def imported(tiny):
    return {name: load_hf_model(tiny(name)[0]) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_load_balancing_loss_equal_transformers(tiny, imported, tmp_path, name):
    folder, ref = tiny(name)
    model = imported[name]
    experts = model.layers.moe_blocks if model.config.moe_every > 1 else model.layers.blocks
    assert model.config.num_experts == 4 and experts.mlp.wi[...].shape[:2] == (2, 4)
    ids, mask = padded_batch(seed=2)
    logits, aux = logits_and_aux_loss(model, ids, mask)
    out = torch_forward(ref, ids, mask, output_router_logits=True)
    assert masked_max_diff(logits, out.logits.numpy(), mask) < TOL
    aux = float(aux)
    assert abs(aux - float(out.aux_loss)) < 1e-5, (aux, float(out.aux_loss))
    unmasked = torch_forward(ref, ids, None, output_router_logits=True).aux_loss
    assert abs(aux - float(unmasked)) > 1e-4  # Padding changes the loss: the mask matters.
    fused = load_hf_model(fused_folder(folder, ref, tmp_path / "fused"))
    assert masked_max_diff(logits_and_aux_loss(fused, ids, mask)[0], out.logits.numpy(),
                           mask) < TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers_with_same_logits(tiny, imported, tmp_path, name):
    import transformers

    _, ref = tiny(name)
    exported = export_hf(imported[name], tmp_path / name)
    assert json.loads((exported / "config.json").read_text())["model_type"] == ref.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids, mask = padded_batch(seed=3)
    np.testing.assert_allclose(torch_forward(again, ids, mask).logits.numpy(),
                               torch_forward(ref, ids, mask).logits.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_step2"])
def test_greedy_generation_equals_transformers(tiny, imported, name):
    _, ref = tiny(name)
    prompts = [[5, 17, 33, 8, 40, 11], [9, 4]]
    new = 6
    ref.generation_config.eos_token_id = None  # Compare all tokens.
    ours = generate(imported[name], prompts, SamplingConfig(max_new_tokens=new)).sequences()
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


def test_expert_count_mismatch_is_a_clear_error(tiny, tmp_path):
    folder, _ = tiny("mixtral")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(ValueError, match="routes to 4 experts but config.json says num_experts=8"):
        load_hf_model(bad)
