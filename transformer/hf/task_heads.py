"""Hugging Face classifiers as our `TaskModel`: the backbone through the importer, the linear
layer on top as the head.

  BERT (`BertFor{Sequence,Token}Classification`): the `classifier` layer. The sequence classifier
      reads the pooler output ([CLS] through dense + tanh), our `pooling='pooler'`.
  Llama, Mistral (`LlamaFor{Sequence,Token}Classification`, ...): the `score` layer (no bias for
      sequences). The sequence classifier reads the last non-padding token, our `pooling='last'`
      (transformers finds it from `pad_token_id`, we from the attention mask: the same for right
      padding).
Token classifiers read every token's final state.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from flax import nnx

from transformer.hf.importer import load_hf_model, read_hf_config
from transformer.hf.safetensors_io import SafetensorsReader
from transformer.models.heads import Head, HeadConfig, TaskModel

# The architecture-name ending in config.json → our head kind.
HEAD_SUFFIXES = {"ForSequenceClassification": "classification",
                 "ForTokenClassification": "token_classification"}
# model_type → (the head layer's name, sequence pooling); the layer's bias may be absent (zero).
HEADS = {"bert": ("classifier", "pooler"), "llama": ("score", "last"), "mistral": ("score", "last")}


def hf_head_kind(folder: str | pathlib.Path) -> str | None:
    """The head kind of an HF folder's `architectures`, None for a base or LM model."""
    for name in read_hf_config(folder).get("architectures") or []:
        for suffix, kind in HEAD_SUFFIXES.items():
            if name.endswith(suffix):
                return kind
    return None


def load_hf_task_model(folder: str | pathlib.Path, *, dtype: str | None = None) -> TaskModel:
    """The classifier of an HF folder as a TaskModel (single device), its logits those of
    transformers' model in eval mode."""
    folder = pathlib.Path(folder)
    hf = read_hf_config(folder)
    kind = hf_head_kind(folder)
    if kind is None or hf.get("model_type") not in HEADS:
        raise ValueError(
            f"{folder} is not a sequence- or token-classification model of a supported family "
            f"({sorted(HEADS)}; architectures {hf.get('architectures')}, model_type "
            f"{hf.get('model_type')!r}): import its base model with transformer.convert and "
            "fine-tune a head on it instead")
    layer, pooling = HEADS[hf["model_type"]]
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    reader = SafetensorsReader(folder)
    if weight not in reader.names():
        raise ValueError(f"{folder} lacks the head tensor {weight}")
    kernel = reader.read(weight).T  # torch Linear [labels, hidden] → [hidden, labels]
    has_bias = bias in reader.names()
    backbone = load_hf_model(folder, dtype=dtype, read_elsewhere=(weight, bias)[:1 + has_bias],
                             without_lm_head=layer == "score")
    if kind == "classification" and pooling == "pooler" and not backbone.config.pooler:
        raise ValueError(f"{folder} has a sequence classifier but no pooler tensors")
    head = HeadConfig(kind, num_labels=kernel.shape[1],
                      pooling=pooling if kind == "classification" else "cls")
    # The shell of a TaskModel, its parts replaced: no backbone is initialised only to be dropped.
    model = nnx.eval_shape(lambda: TaskModel(backbone.config, head, rngs=nnx.Rngs(0)))
    model.backbone = backbone
    model.head = Head(backbone.config, head, rngs=nnx.Rngs(0))
    model.head.kernel[...] = kernel.astype(model.head.kernel[...].dtype)
    model.head.bias[...] = (reader.read(bias).astype(model.head.bias[...].dtype) if has_bias
                            else jnp.zeros_like(model.head.bias[...]))
    return model
