"""Bad input fails with a message that names the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from transformer.hf import load_hf_model
from transformer.pretrained import from_pretrained


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_pickle_only_folder_is_refused(tiny, tmp_path):
    folder = copy(tiny("gpt2")[0], tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError) as error:
        load_hf_model(folder)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "execute code" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message


def test_missing_tensor_is_named(tiny, tmp_path):
    folder = copy(tiny("llama_untied")[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \(for layers"):
        load_hf_model(folder)


def test_shape_mismatch_names_tensor_and_shapes(tiny, tmp_path):
    folder = copy(tiny("gpt2")[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_hf_model(folder)
    message = str(error.value)
    assert "transformer.h.0.mlp.c_fc.weight: checkpoint shape (32, 100), expected (32, 128)" in message
    assert "layers.blocks.mlp.wi" in message


def test_unknown_architecture_is_named(tiny, tmp_path):
    folder = copy(tiny("gpt2")[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='mamba'; supported: \['bart', 'bert', 'gpt2'"):
        load_hf_model(folder)
    config["model_type"] = "t5"  # A known family, but GPT-2's fields.
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has no field 'd_model', which T5 needs"):
        load_hf_model(folder)


def test_unsupported_config_field_is_named(tiny, tmp_path):
    folder = copy(tiny("llama_untied")[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        load_hf_model(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face folder"):
        from_pretrained(tmp_path)


def test_sharded_safetensors_with_index_and_bfloat16(tiny, tmp_path):
    """A checkpoint split over two files (with the index), stored in bfloat16, loads too."""
    import ml_dtypes

    folder = copy(tiny("llama_tied")[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_bf16(folder / shard, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_hf_model(folder)
    expected = tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(model.embeddings.tokens[...], expected)


def save_bf16(path, tensors):
    """Writes bfloat16 safetensors by hand (safetensors' numpy writer has no bfloat16)."""
    import struct

    import ml_dtypes

    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        blob = value.astype(ml_dtypes.bfloat16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
