"""Hugging Face BERT classifiers (`BertForSequenceClassification`, `BertForTokenClassification`)
as our `TaskModel`: the backbone through the importer, the linear `classifier` as the head.

BERT's sequence classifier reads the pooler output ([CLS] through dense + tanh), which is our
`pooling='pooler'`; the token classifier reads every token's final state.
"""

from __future__ import annotations

import pathlib

from flax import nnx

from transformer.hf.importer import load_hf_model, read_hf_config
from transformer.hf.safetensors_io import SafetensorsReader
from transformer.models.heads import Head, HeadConfig, TaskModel

# The architecture-name ending in config.json → our head kind.
HEAD_SUFFIXES = {"ForSequenceClassification": "classification",
                 "ForTokenClassification": "token_classification"}
HEAD_TENSORS = ("classifier.weight", "classifier.bias")


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
    if kind is None or hf.get("model_type") != "bert":
        raise ValueError(
            f"{folder} is not a BERT sequence- or token-classification model (architectures "
            f"{hf.get('architectures')}, model_type {hf.get('model_type')!r}): import its base "
            "model with transformer.convert and fine-tune a head on it instead")
    reader = SafetensorsReader(folder)
    if not set(HEAD_TENSORS) <= reader.names():
        raise ValueError(f"{folder} lacks the tensors classifier.weight / classifier.bias")
    kernel = reader.read("classifier.weight").T  # torch Linear [labels, hidden] → [hidden, labels]
    backbone = load_hf_model(folder, dtype=dtype, read_elsewhere=HEAD_TENSORS)
    if kind == "classification" and not backbone.config.pooler:
        raise ValueError(f"{folder} has a sequence classifier but no pooler tensors")
    head = HeadConfig(kind, num_labels=kernel.shape[1],
                      pooling="pooler" if kind == "classification" else "cls")
    # The shell of a TaskModel, its parts replaced: no backbone is initialised only to be dropped.
    model = nnx.eval_shape(lambda: TaskModel(backbone.config, head, rngs=nnx.Rngs(0)))
    model.backbone = backbone
    model.head = Head(backbone.config, head, rngs=nnx.Rngs(0))
    model.head.kernel[...] = kernel.astype(model.head.kernel[...].dtype)
    model.head.bias[...] = reader.read("classifier.bias").astype(model.head.bias[...].dtype)
    return model
