"""`from_pretrained`: a tokenizer and a model from a Hugging Face folder or our checkpoint.

    tokenizer, model = from_pretrained("path/to/bert-dir")
    outputs = model(**tokenizer("Hello, world!", return_tensors="jax"))
    outputs.last_hidden_state   # [batch, length, hidden]
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from jax.sharding import Mesh

from transformer import model_io
from transformer.hf import importer
from transformer.models import Decoder, Encoder
from transformer.sharding import Rules


def _tokenizer(folder: pathlib.Path) -> Any:
    from transformer.data.tokenizer import load_tokenizer

    if not folder.is_dir():
        logging.warning("no tokenizer: %s does not exist", folder)
        return None
    try:
        return load_tokenizer(folder)
    except FileNotFoundError as error:
        logging.warning("no tokenizer loaded from %s: %s", folder, error)
        return None


def from_pretrained(
    path: str | pathlib.Path,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> tuple[Any, Encoder | Decoder]:
    """(tokenizer, model) from a local HF folder (config.json + safetensors) or our checkpoint.

    With a mesh, parameters are created directly in the layout the logical `rules` (default
    `sharding.DEFAULT_RULES`) give. `dtype` overrides the compute dtype (e.g. 'bfloat16');
    parameters stay float32. The tokenizer is None (with a warning) when the folder has none.
    `quantize` ('int8', 'int4') quantizes the weights (`transformer.quantize`); a checkpoint saved
    quantized (`save_quantized`) loads quantized, and only as what it was saved as.
    """
    from transformer import quantize as q

    if quantize is not None:
        q.check_mode(quantize)  # Before anything is loaded.
    quantized = lambda model: model if quantize is None else q.quantize(model, quantize)
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (downloads are not supported: pass a "
                                "local Hugging Face folder or a checkpoint written by save_model)")
    if model_io.is_model_checkpoint(path) and q.saved_mode(path) is not None:
        model = q.load_quantized(path, dtype=dtype, mode=quantize, mesh=mesh)
        return _tokenizer(path / model_io.TOKENIZER_DIR), model
    if model_io.is_model_checkpoint(path):
        model = model_io.load_model(path, mesh, rules, dtype=dtype)
        return _tokenizer(path / model_io.TOKENIZER_DIR), quantized(model)
    if (path / importer.CONFIG_FILE).is_file():
        model = importer.load_hf_model(path, mesh=mesh, rules=rules, dtype=dtype)
        return _tokenizer(path), quantized(model)
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face folder (config.json + model.safetensors) nor a model "
        f"checkpoint ({model_io.CONFIG_FILE} + {model_io.PARAMS_DIR}/)"
    )
