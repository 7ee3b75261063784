"""Our model checkpoint format: what `--config.init_from` and `from_pretrained` read.

A directory (local or gs://) holding
  model_config.json   `ModelConfig.to_dict()`
  params/             an Orbax checkpoint of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
  tokenizer/          optional: the tokenizer files (anything `load_tokenizer` reads)
  pooling.json        optional: how sentence embeddings are pooled (`inference.features.Pooling`)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from transformer import paths
from transformer.models import MODELS, Decoder, Encoder, ModelConfig
from transformer.sharding import DEFAULT_RULES, Rules, state_shardings

CONFIG_FILE = "model_config.json"
# ModelConfig fields that say how to run a model, not what it is: a recipe keeps them when the
# architecture comes from a checkpoint (`init_from`, a distillation teacher).
RUNTIME_FIELDS = ("dropout_rate", "attention_dropout_rate", "attention_impl", "dtype",
                  "scan_layers", "remat_policy", "lora_rank", "lora_alpha", "lora_targets",
                  "lora_dropout", "lora_rslora")
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "*.model", "added_tokens.json",
    "chat_template.jinja", "generation_config.json",
)


def flat_params(tree: Any) -> dict[str, Any]:
    """{'layers.blocks.attention.query': leaf, ...} of an NNX state or a nested dict."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, (*prefix, str(key)))
        else:
            out[".".join(prefix)] = node

    walk(tree, ())
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of a `flat_params` mapping."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    path = paths.as_path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files of `source` (a folder) into `target`; returns their names."""
    source, target = paths.as_path(source), paths.as_path(target)
    files = sorted({p for pattern in TOKENIZER_PATTERNS for p in source.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"no tokenizer files in {source} (looked for {TOKENIZER_PATTERNS})")
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        paths.copy_file(f, target / f.name)
    return [f.name for f in files]


def local_tokenizer_copy(path: str | os.PathLike) -> pathlib.Path:
    """A local copy of a gs:// tokenizer (a folder, or a file with the files beside it that it
    needs), in a new temporary folder: tokenizer libraries open local files only."""
    source = paths.as_path(path)
    if not source.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    folder, name = (source, None) if source.is_dir() else (source.parent, source.name)
    target = pathlib.Path(tempfile.mkdtemp(prefix="tokenizer-"))
    copy_tokenizer_files(folder, target)
    return target if name is None else target / name


def save_model(
    directory: str | os.PathLike,
    model: Encoder | Decoder,
    tokenizer_dir: str | os.PathLike | None = None,
) -> epath.Path:
    """Writes `model` (and the tokenizer files of `tokenizer_dir`) in our checkpoint format."""
    directory = paths.absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # Metadata is written once; Orbax coordinates the arrays.
        (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, directory / TOKENIZER_DIR)
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    path = paths.as_path(directory) / CONFIG_FILE
    if not path.is_file():
        if (path.parent / "config.json").is_file():  # A Hugging Face folder, not ours.
            raise FileNotFoundError(
                f"{directory} is a Hugging Face folder, not a model checkpoint of ours: convert it "
                f"once with `python -m transformer.convert import --hf_dir={directory} "
                "--output=DIR` and use DIR")
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a model checkpoint directory")
    saved = json.loads(path.read_text())
    if "quantization" in saved:  # Written by transformer.quantize.save_quantized.
        raise ValueError(
            f"{directory} holds {saved['quantization'].get('mode')} quantized weights, not float "
            "ones: load it with transformer.from_pretrained (or --quantize on the command lines); "
            "it cannot be trained from or loaded as a float model")
    return ModelConfig.from_dict(saved)


def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of the saved parameters, from the checkpoint metadata (no array is read)."""
    params = paths.absolute(directory) / PARAMS_DIR
    if not params.is_dir():
        raise FileNotFoundError(f"no {PARAMS_DIR}/ in {directory}: not a model checkpoint directory")
    tree = ocp.StandardCheckpointer().metadata(params).item_metadata.tree
    return {path: tuple(meta.shape) for path, meta in flat_params(tree).items()}


def check_shapes(expected: Mapping[str, tuple[int, ...]], directory: str | os.PathLike) -> None:
    """Fails naming every parameter whose saved shape differs from the model's, or that is absent."""
    saved = checkpoint_shapes(directory)
    problems = [f"{p}: checkpoint {saved[p]} vs model {tuple(s)}"
                for p, s in expected.items() if p in saved and saved[p] != tuple(s)]
    if missing := sorted(set(expected) - set(saved)):
        problems.append(f"not in the checkpoint: {missing}")
    if extra := sorted(set(saved) - set(expected)):
        problems.append(f"in the checkpoint but not in the model: {extra}")
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit the model: " + "; ".join(problems))


def _restore(directory: str | os.PathLike, target: dict[str, Any]) -> dict[str, Any]:
    return ocp.StandardCheckpointer().restore(paths.absolute(directory) / PARAMS_DIR, target)


def load_model(
    directory: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    dtype: str | None = None,
) -> Encoder | Decoder:
    """The saved model; with a mesh, every array is restored straight into its sharded layout."""
    directory = paths.as_path(directory)
    config = read_config(directory)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    abstract = nnx.eval_shape(lambda: MODELS[config.architecture](config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = flat_params(state)
    check_shapes({p: x.shape for p, x in shapes.items()}, directory)
    if mesh is not None:
        shardings = flat_params(state_shardings(state, mesh, rules or DEFAULT_RULES))
    else:
        default = SingleDeviceSharding(jax.local_devices()[0])
        shardings = dict.fromkeys(shapes, default)
    target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[p])
              for p, x in shapes.items()}
    restored = _restore(directory, unflatten(target))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_params(
    directory: str | os.PathLike, shapes: Any, shardings: Any | None = None
) -> dict[str, Any]:
    """The saved parameters as a nested dict (the layout of `nnx.to_pure_dict`).

    `shapes` is that nested dict for the model being trained (arrays or ShapeDtypeStructs); every
    saved shape must equal it. `shardings` (the same tree of NamedShardings) restores each array
    straight into its sharded layout; without it, arrays go to the first local device.
    """
    directory = paths.as_path(directory)
    flat_shapes = flat_params(shapes)
    check_shapes({p: x.shape for p, x in flat_shapes.items()}, directory)
    if shardings is not None:
        flat_shardings = flat_params(shardings)
    else:
        flat_shardings = dict.fromkeys(flat_shapes, SingleDeviceSharding(jax.local_devices()[0]))
    target = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_shardings[p])
              for p, x in flat_shapes.items()}
    restored = _restore(directory, unflatten(target))
    logging.info("loaded %d parameters from %s", len(flat_shapes), directory)
    return restored


def load_params_into(model_or_state: nnx.Module | nnx.State, directory: str | os.PathLike) -> Any:
    """Overwrites the parameters of a model (or an NNX Param state) with the saved ones.

    The arrays keep the model's current shardings and dtypes. Returns the model or state.
    """
    is_model = isinstance(model_or_state, nnx.Module)
    state = nnx.state(model_or_state, nnx.Param) if is_model else model_or_state
    current = nnx.to_pure_dict(state)
    shardings = jax.tree.map(lambda x: x.sharding, current)
    nnx.replace_by_pure_dict(state, load_params(directory, current, shardings))
    if is_model:
        nnx.update(model_or_state, state)
    return model_or_state
