"""Embeddings, normalization and feed-forward layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.models import lora
from transformer.models import positions as pos
from transformer.models.common import dtype_of, param
from transformer.models.config import ModelConfig
from transformer.sharding import constrain

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kind, self.eps, self.dtype = config.norm, config.norm_eps, dtype_of(config.dtype)
        d, pd = config.hidden_size, config.param_dtype
        self.scale = param(rngs, (d,), ("embed",), value=1.0, dtype=pd)
        if self.kind == "layernorm":
            self.bias = param(rngs, (d,), ("embed",), dtype=pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...] + self.bias[...]
        else:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...]
        return y.astype(self.dtype)


class MLP(nnx.Module):
    """Linear → activation → Linear; gated variants multiply by a second projection (SwiGLU)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f, std, pd = config.hidden_size, config.mlp_dim, config.initializer_range, config.param_dtype
        out_std = std / math.sqrt(2 * config.num_layers) if config.scale_residual_init else std
        self.wi = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        if config.gated_mlp:
            self.wi_gate = param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd)
        self.wo = param(rngs, (f, d), ("mlp", "embed"), std=out_std, dtype=pd)
        if config.mlp_bias:
            self.bi = param(rngs, (f,), ("mlp",), dtype=pd)
            self.bo = param(rngs, (d,), ("embed",), dtype=pd)
        embed, hidden = lora.Side((d,), ("embed",)), lora.Side((f,), ("mlp",))
        self.wi_lora = lora.adapter(config, "wi", embed, hidden, rngs)
        if config.gated_mlp:
            self.wi_gate_lora = lora.adapter(config, "wi_gate", embed, hidden, rngs)
        self.wo_lora = lora.adapter(config, "wo", hidden, embed, rngs)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """`dropout_rng` only feeds the adapters' input dropout (LoRA), if any."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        act = ACTIVATION_FNS[cfg.activation]
        lora_rngs = lora.dropout_rngs(cfg, dropout_rng, 3)
        x = x.astype(dtype)
        h = lora.apply(self.wi_lora, x, x @ self.wi[...].astype(dtype), lora_rngs[0])
        if cfg.mlp_bias:
            h = h + self.bi[...].astype(dtype)
        h = act(h)
        if cfg.gated_mlp:
            gate = x @ self.wi_gate[...].astype(dtype)
            h = h * lora.apply(self.wi_gate_lora, x, gate, lora_rngs[1])
        h = constrain(h, ("batch", "length", "act_mlp"))
        y = lora.apply(self.wo_lora, h, h @ self.wo[...].astype(dtype), lora_rngs[2])
        if cfg.mlp_bias:
            y = y + self.bo[...].astype(dtype)
        return constrain(y, ("batch", "length", "act_embed"))


def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table`, gathered from a replicated copy: a gather from a vocab- or embed-sharded
    table would need an all-to-all into the batch-sharded layout, which SPMD does by replicating
    the result instead (slower, and loud)."""
    return jnp.take(constrain(table, (None, None)), ids, axis=0)


class Embeddings(nnx.Module):
    """Token embeddings plus absolute positions (learned or sinusoidal) and token types."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, learned_positions: bool = True):
        """`learned_positions=False`: the tokens only, even where the config learns positions
        (an encoder-decoder shares its token table but keeps one position table per stack)."""
        self.config = config
        self.learned = config.position == "learned" and learned_positions
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        self.tokens = param(rngs, (config.vocab_size, d), ("vocab", "embed"), std=std, dtype=pd)
        if self.learned:
            self.positions = param(rngs, (config.max_length, d), (None, "embed"), std=std, dtype=pd)
        if config.type_vocab_size:
            shape = (config.type_vocab_size, d)
            self.token_types = param(rngs, shape, (None, "embed"), std=std, dtype=pd)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        token_type_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """`inputs_embeds` [batch, length, hidden] stand in for the token embeddings of
        `input_ids` (positions and token types are still added): attributions differentiate them."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        if inputs_embeds is None:
            x = _lookup(self.tokens[...].astype(dtype), input_ids)
        else:
            x = inputs_embeds.astype(dtype)
        if self.learned:
            x = x + _lookup(self.positions[...].astype(dtype), positions)
        elif cfg.position == "sinusoidal":
            x = x + pos.sinusoidal(positions, cfg.hidden_size).astype(dtype)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + _lookup(self.token_types[...].astype(dtype), types)
        return constrain(x, ("batch", "length", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the token-embedding matrix (a tied output layer)."""
        dtype = dtype_of(self.config.dtype)
        # An einsum, not `x @ table.T`: XLA then reads the table as stored instead of
        # transposing it first (for one token, that copy cost more than the product).
        logits = jnp.einsum("...d,vd->...v", x.astype(dtype), self.tokens[...].astype(dtype))
        return constrain(logits, ("batch", "length", "act_vocab"))
