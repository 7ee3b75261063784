"""Import a local Hugging Face folder (config.json + safetensors) as one of our models.

Each parameter is built with `jax.make_array_from_callback` in its final sharding: every device's
block is read straight from the memory-mapped safetensors (only the rows and columns that block
needs), so the whole model never sits in host memory at once.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from transformer import model_io
from transformer.hf import families, mapping
from transformer.hf.safetensors_io import SafetensorsReader
from transformer.models import MODELS, Decoder, Encoder, ModelConfig
from transformer.sharding import DEFAULT_RULES, Rules, state_shardings

CONFIG_FILE = "config.json"


def read_hf_config(folder: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not a Hugging Face model folder")
    return json.loads(path.read_text())


def is_hf_folder(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path) / CONFIG_FILE
    return path.is_file() and "model_type" in json.loads(path.read_text())


def hf_model_config(folder: str | pathlib.Path) -> tuple[families.Family, ModelConfig, str]:
    """The family, our config and the tensor-name prefix of an HF folder (reads no weights)."""
    hf = read_hf_config(folder)
    family = families.family_for_model_type(hf.get("model_type"))
    names = SafetensorsReader(folder).names()
    return family, _config_from_hf(family, hf, names, folder), family.prefix(names)


def _config_from_hf(family: families.Family, hf: dict[str, Any], names: Collection[str],
                    folder: str | pathlib.Path) -> ModelConfig:
    try:
        return family.config_from_hf(hf, names)
    except KeyError as missing:
        raise ValueError(f"{pathlib.Path(folder) / CONFIG_FILE} has no field {missing}, which "
                         f"{family.name} needs (is model_type={hf.get('model_type')!r} right?)"
                         ) from None


def load_hf_model(
    folder: str | pathlib.Path,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    read_elsewhere: Collection[str] = (),
    without_lm_head: bool = False,
) -> Encoder | Decoder:
    """Our model with the weights of an HF folder; sharded by `rules` over `mesh` when given.

    `dtype` sets the compute dtype and `param_dtype` the storage dtype (default float32).
    `read_elsewhere` names tensors the caller reads itself (a task head), not reported unused.
    `without_lm_head`: a decoder backbone whose logits nothing reads (a classifier's, which has
    no lm_head tensor), built with the output embedding tied so that none is needed.
    """
    folder = pathlib.Path(folder)
    hf = read_hf_config(folder)
    family = families.family_for_model_type(hf.get("model_type"))
    reader = SafetensorsReader(folder)
    names = reader.names()
    config = _config_from_hf(family, hf, names, folder)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    if without_lm_head:
        overrides["tie_embeddings"] = True
    config = config.replace(**overrides)
    _check_experts(config, reader, family.prefix(names))
    specs = families.specs_for(family, config, family.prefix(names), names)

    abstract = nnx.eval_shape(lambda: MODELS[config.architecture](config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = model_io.flat_params(state_shardings(abstract_state, mesh, rules or DEFAULT_RULES))
    else:
        shardings = {}
    shapes = {path: x.shape for path, x in model_io.flat_params(abstract_state).items()}
    _check(specs, shapes, reader, folder, set(read_elsewhere))

    default = SingleDeviceSharding(jax.local_devices()[0])
    target = jnp.dtype(config.param_dtype)
    arrays = {}
    for path, shape in shapes.items():
        spec = specs.get(path)
        if spec is None:  # Checked above: a parameter the HF model lacks that starts at zero.
            arrays[path] = jax.device_put(jnp.zeros(shape, target), shardings.get(path, default))
            continue
        read = lambda index, spec=spec: mapping.read_block(spec, index, reader.read).astype(target)
        arrays[path] = jax.make_array_from_callback(shape, shardings.get(path, default), read)
    nnx.replace_by_pure_dict(abstract_state, model_io.unflatten(arrays))
    return nnx.merge(graphdef, abstract_state)


# Parameters an HF checkpoint may lack by design: BertModel has no MLM output bias, Qwen2 no
# attention output bias.
ZERO_IF_ABSENT = ("lm_bias", "layers.blocks.attention.out_bias",
                  "layers.moe_blocks.attention.out_bias", "logits_bias")


def _check_experts(config: ModelConfig, reader: SafetensorsReader, prefix: str) -> None:
    """The experts the checkpoint's routers route to must be config.json's expert count."""
    if not config.num_experts:
        return
    for name in reader.names():
        if name.startswith(prefix + "layers.") and name.endswith("mlp.gate.weight") or (
                name.endswith("block_sparse_moe.gate.weight")):
            rows = reader.shape(name)[0]
            if rows != config.num_experts:
                raise ValueError(
                    f"{name} routes to {rows} experts but config.json says num_experts="
                    f"{config.num_experts}; the folder mixes two models: fix config.json or "
                    "use the weights of the configured model")


def _check(
    specs: dict[str, mapping.Spec], shapes: dict[str, tuple[int, ...]], reader: SafetensorsReader,
    folder: pathlib.Path, read_elsewhere: Collection[str] = (),
) -> None:
    """Every parameter has its tensors, of the right shapes; unused tensors are reported."""
    missing, wrong, used = [], [], set()
    for path, shape in shapes.items():
        spec = specs.get(path)
        if spec is None:
            if path not in ZERO_IF_ABSENT:
                raise ValueError(f"no Hugging Face tensor is mapped to our parameter {path!r}")
            logging.info("%s: no tensor for %s in the checkpoint; it starts at zero", folder, path)
            continue
        assert spec.shape == tuple(shape), (path, spec.shape, shape)
        for name in spec.names:
            used.add(name)
            if name not in reader.files:
                missing.append(f"{name} (for {path})")
            elif reader.shape(name) != spec.hf_shape:
                wrong.append(f"{name}: checkpoint shape {reader.shape(name)}, expected "
                             f"{spec.hf_shape} from config.json (for our {path} {tuple(shape)})")
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} tensor(s) the model needs: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
        )
    if wrong:
        raise ValueError(f"{folder}: tensor shapes disagree with config.json: {wrong[:10]}")
    unused = sorted(n for n in set(reader.files) - used - set(read_elsewhere)
                    if not n.endswith(families.IGNORED_SUFFIXES) and not _tied_copy(n))
    if unused:
        logging.warning("%s: %d tensor(s) not used by the model: %s", folder, len(unused), unused[:10])


def _tied_copy(name: str) -> bool:
    """Output layers that some checkpoints store although they are tied to the embeddings."""
    return name in ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                    "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
