"""Export our models as Hugging Face folders that `transformers` loads as they are."""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import numpy as np
from flax import nnx

from transformer import model_io
from transformer.hf import families, mapping
from transformer.hf.safetensors_io import SINGLE_FILE, write_safetensors
from transformer.models import Decoder, Encoder


def hf_tensors(model: Encoder | Decoder) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json contents, {HF tensor name: array}) of our model."""
    config = model.config
    family = families.family_for_config(config)
    specs = family.specs(config, family.export_prefix(config))
    params = model_io.flat_params(nnx.state(model, nnx.Param))
    skipped = sorted(set(params) - set(specs))
    if skipped:  # E.g. the MLM bias of an encoder without MLM head: BertModel has no place for it.
        logging.warning("not exported (no Hugging Face equivalent): %s", skipped)
    # Qwen2 has no attention output bias: one that was trained away from 0 cannot be written.
    if trained := [p for p in skipped if p.endswith("attention.out_bias") and np.any(
            np.asarray(jax.device_get(params[p])) != 0)]:
        raise ValueError(f"{trained} are not zero, but {family.name} has no attention output "
                         "bias: the exported model would compute something else (our model "
                         "trains that bias; zero it to export, at the cost of that change)")
    paths = sorted(specs)
    values = [np.asarray(jax.device_get(params[p])) for p in paths]
    tensors = mapping.assemble([specs[p] for p in paths], values)
    hf_config = family.config_to_hf(config)
    hf_config["dtype"] = str(values[0].dtype) if values else "float32"
    return hf_config, tensors


def export_hf(
    model: Encoder | Decoder,
    output: str | pathlib.Path,
    tokenizer_dir: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Writes config.json, model.safetensors and the tokenizer files of `tokenizer_dir`."""
    output = pathlib.Path(output)
    hf_config, tensors = hf_tensors(model)
    if jax.process_index() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_safetensors(tensors, output / SINGLE_FILE)
        if tokenizer_dir is not None:
            model_io.copy_tokenizer_files(tokenizer_dir, output)
    return output
