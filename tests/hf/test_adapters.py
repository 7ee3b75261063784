"""LoRA adapters and Hugging Face peft: ours exported load in peft with the same outputs, peft's
load here with peft's outputs, merged equals unmerged, and bad adapters are refused."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from tests.hf.tiny_models import random_ids, torch_forward
from transformer import model_io
from transformer.hf import adapters, export_hf, load_hf_model
from transformer.models import MODELS, build_model, get_preset

TINY_LLAMA = get_preset("llama-tiny", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, mlp_dim=64, max_length=64)
CASES = {  # tiny model: (our targets, what to compare)
    "llama_untied": (("all-linear",), "logits"),
    "mistral": (("query", "value", "wo"), "logits"),
    "gpt2": (("all-linear",), "logits"),
    "bert_base": (("query", "key", "value", "out", "wi", "wo"), "last_hidden_state"),
}


def with_random_adapters(base, targets, rank=4, seed=0):
    """The base model with adapters whose A and B are both random (B = 0 would hide mistakes)."""
    config = base.config.replace(lora_rank=rank, lora_alpha=8.0, lora_targets=targets)
    shapes = model_io.flat_params(nnx.state(nnx.eval_shape(
        lambda: MODELS[config.architecture](config, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(seed)
    factors = {k: jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32)
               for k, v in shapes.items() if "_lora." in k}
    return adapters.with_params(config, {**model_io.flat_params(nnx.state(base, nnx.Param)),
                                         **factors})


def output(model, ids, mask, kind):
    return np.asarray(getattr(model(ids, mask), kind))


def torch_output(model, ids, mask, kind):
    out = torch_forward(model, ids, mask)
    return (out.logits if kind == "logits" else out.last_hidden_state).numpy()


@pytest.fixture(scope="module")
def batch():
    ids = random_ids(2, 10, seed=5)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CASES))
def test_exported_adapter_in_peft_gives_our_outputs(tiny, tmp_path, batch, name):
    targets, kind = CASES[name]
    folder, hf = tiny(name)
    base = load_hf_model(folder)
    model = with_random_adapters(base, targets)
    adapter_dir = adapters.export_adapter(model, tmp_path / "adapter", str(folder))
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(folder)
    assert isinstance(settings["target_modules"], list) and settings["target_modules"]

    ids, mask = batch
    peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    # Every adapter peft made received our tensors (a key peft does not know would leave B at 0).
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)
    ours, theirs = output(model, ids, mask, kind), torch_output(peft_model, ids, mask, kind)
    m = mask[..., None]
    np.testing.assert_allclose(ours * m, theirs * m, atol=1e-4)
    plain = output(base, ids, mask, kind)
    assert np.abs((plain - ours) * m).max() > 1e-2  # The adapters change the outputs.
    peft_model.unload()

    # Merged into the weights: the same function, in our model and exported to transformers.
    merged = adapters.merge(model)
    assert merged.config.lora_rank == 0
    np.testing.assert_allclose(output(merged, ids, mask, kind) * m, ours * m, atol=1e-5)
    reloaded = adapters.load_adapter(base, adapter_dir)
    np.testing.assert_allclose(output(reloaded, ids, mask, kind) * m, ours * m, atol=1e-5)


def test_merged_export_loads_in_transformers(tmp_path, batch):
    base = build_model(TINY_LLAMA, seed=1)
    model = with_random_adapters(base, ("all-linear",))
    folder = export_hf(adapters.merge(model), tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask = batch
    m = mask[..., None]
    np.testing.assert_allclose(torch_output(ref, ids, mask, "logits") * m,
                               output(model, ids, mask, "logits") * m, atol=1e-4)


@pytest.fixture(scope="module")
def peft_trained(tiny, tmp_path_factory):
    """A LoRA adapter trained by peft itself (a few AdamW steps on the tiny Llama), saved."""
    folder, _ = tiny("llama_untied")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             lora_dropout=0.0, init_lora_weights=True)
    model = peft.get_peft_model(hf, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(random_ids(4, 12, seed=9), dtype=torch.long)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return folder, model, out


def test_adapter_trained_by_peft_gives_peft_outputs(peft_trained, batch):
    folder, peft_model, adapter_dir = peft_trained
    model = adapters.load_adapter(load_hf_model(folder), adapter_dir)
    assert model.config.lora_rank == 4 and model.config.lora_alpha == 16
    assert set(model.config.lora_targets) == {"query", "value", "wo"}
    ids, mask = batch
    m = mask[..., None]
    np.testing.assert_allclose(output(model, ids, mask, "logits") * m,
                               torch_output(peft_model, ids, mask, "logits") * m, atol=1e-4)


def test_adapter_for_another_base_is_refused(peft_trained, tiny):
    _, _, adapter_dir = peft_trained
    folder, _ = tiny("mistral")  # Another head_dim: the q_proj adapter cannot fit.
    with pytest.raises(ValueError, match="trained for another base model"):
        adapters.load_adapter(load_hf_model(folder), adapter_dir)


def test_unsupported_and_stray_adapters_are_refused(peft_trained, tmp_path):
    folder, _, adapter_dir = peft_trained
    base = load_hf_model(folder)
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        adapters.load_adapter(base, bad)
    from transformer.hf.safetensors_io import SafetensorsReader, write_safetensors

    reader = SafetensorsReader(adapter_dir)
    tensors = {n: reader.read(n, tuple(slice(None) for _ in reader.shape(n)))
               for n in reader.names()}
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "adapter_config.json").write_text(json.dumps(settings))
    name = next(n for n in sorted(tensors) if ".layers.0." in n)
    write_safetensors({**tensors, name.replace(".layers.0.", ".layers.7."): tensors[name]},
                      stray / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="fit no layer of the base model"):
        adapters.load_adapter(base, stray)
    with pytest.raises(ValueError, match="without adapters"):
        adapters.load_adapter(with_random_adapters(base, ("query",)), adapter_dir)


def test_lora_config_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"matches no linear layer; this model's linear layers are "
                                         r"\['query', 'key', 'value', 'out', 'wi', 'wo'\]"):
        get_preset("gpt2-tiny", lora_rank=4, lora_targets=("c_attn",))
    with pytest.raises(ValueError, match="lora_rank=-2 must be positive"):
        get_preset("llama-tiny", lora_rank=-2, lora_targets=("query",))
    with pytest.raises(ValueError, match="lora_targets is empty"):
        get_preset("llama-tiny", lora_rank=4)
    with pytest.raises(ValueError, match="matches no linear layer"):
        get_preset("bert-tiny", lora_rank=4, lora_targets=("wi_gate",))  # No gated MLP.
    config = get_preset("llama-tiny", lora_rank=4, lora_targets=("q_proj", "mlp"))
    assert config.lora_targets == ("query", "wi", "wi_gate", "wo")  # HF names and groups.
    with pytest.raises(ValueError, match="no LoRA adapters"):
        adapters.export_adapter(build_model(get_preset("llama-tiny", vocab_size=64)), "/nonexistent")
