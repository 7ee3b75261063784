"""Flax NNX Transformer models, built by name from one `ModelConfig`."""

from __future__ import annotations

import math

import jax
from flax import nnx

from transformer.models.attention import KVCache, dot_product_attention, make_attention_mask
from transformer.models.config import PRESETS, ModelConfig, get_preset
from transformer.models.encoder_decoder import EncoderDecoder
from transformer.models.transformer import Decoder, Encoder, ModelOutput

MODELS: dict[str, type[nnx.Module]] = {
    "encoder": Encoder, "decoder": Decoder, "encoder_decoder": EncoderDecoder,
}


def build_model(config: ModelConfig | str, *, seed: int = 0) -> Encoder | Decoder | EncoderDecoder:
    """A freshly initialized model for a config or a preset name (on the default device)."""
    config = get_preset(config) if isinstance(config, str) else config
    return MODELS[config.architecture](config, rngs=nnx.Rngs(seed))


def count_params(config: ModelConfig | str) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    config = get_preset(config) if isinstance(config, str) else config
    abstract = nnx.eval_shape(lambda: MODELS[config.architecture](config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return sum(math.prod(x.shape) for x in leaves)


__all__ = [
    "MODELS", "PRESETS", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "ModelConfig", "ModelOutput",
    "build_model", "count_params", "dot_product_attention", "get_preset", "make_attention_mask",
]
