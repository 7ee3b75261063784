"""Features of an encoder: pooled token states and sentence embeddings.

Sentence-transformers folders (e.g. all-MiniLM-L6-v2) describe their pooling in `modules.json`
and `1_Pooling/config.json`; `read_pooling` reads those files so the embedding equals the one
that library computes (pool the last hidden states over real tokens, then L2-normalize).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

POOLING_FILE = "pooling.json"  # Where our checkpoint format keeps the pooling of a sentence encoder.
MODES = ("mean", "cls", "max")


@dataclasses.dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # One of MODES.
    normalize: bool = False  # L2-normalize the pooled vector (sentence-transformers' Normalize).
    max_length: int | None = None  # Truncate the inputs to this many tokens (max_seq_length).

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not one of {list(MODES)}")


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of hidden [batch, length, dim] over the positions where attention_mask is 1."""
    mask = attention_mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # The clamp of sentence-transformers.


def pool(hidden: jax.Array, attention_mask: jax.Array, pooling: Pooling) -> jax.Array:
    """One vector per sequence, as `pooling` says."""
    if pooling.mode == "mean":
        out = mean_pool(hidden, attention_mask)
    elif pooling.mode == "cls":
        out = hidden[:, 0].astype(jnp.float32)
    else:
        masked = jnp.where(attention_mask[..., None] > 0, hidden.astype(jnp.float32), -1e9)
        out = jnp.max(masked, axis=1)
    if pooling.normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def read_pooling(folder: str | pathlib.Path) -> Pooling | None:
    """The pooling of a sentence-transformers folder or of our checkpoint; None if neither says."""
    folder = pathlib.Path(folder)
    if (folder / POOLING_FILE).is_file():
        return Pooling(**json.loads((folder / POOLING_FILE).read_text()))
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    if "Pooling" not in kinds:
        return None
    settings = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
    mode = next((name for name, key in (("mean", "pooling_mode_mean_tokens"),
                                         ("cls", "pooling_mode_cls_token"),
                                         ("max", "pooling_mode_max_tokens")) if settings.get(key)), None)
    if mode is None:
        raise ValueError(f"{folder}: unsupported sentence-transformers pooling {settings}")
    st_config = folder / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    return Pooling(mode=mode, normalize="Normalize" in kinds, max_length=max_length)


def write_pooling(pooling: Pooling, directory: str | pathlib.Path) -> None:
    (pathlib.Path(directory) / POOLING_FILE).write_text(json.dumps(dataclasses.asdict(pooling)) + "\n")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed(graphdef: Any, state: Any, inputs: dict[str, jax.Array], pooling: Pooling) -> jax.Array:
    out = nnx.merge(graphdef, state)(**inputs, compute_logits=False)
    return pool(out.last_hidden_state, inputs["attention_mask"], pooling)


def sentence_embeddings(
    tokenizer: Any, model: nnx.Module, texts: Sequence[str], pooling: Pooling | None = None,
    *, batch_size: int = 32,
) -> np.ndarray:
    """Embeddings [len(texts), hidden] of texts, pooled (and normalized) as `pooling` says
    (default: the mean over real tokens, not normalized)."""
    pooling = pooling or Pooling()
    graphdef, state = nnx.split(model)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        inputs = tokenizer(batch, return_tensors="jax", max_length=pooling.max_length,
                           truncation=pooling.max_length is not None)
        chunks.append(np.asarray(_embed(graphdef, state, inputs, pooling)))
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.hidden_size), np.float32)
