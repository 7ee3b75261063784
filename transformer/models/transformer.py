"""The encoder (BERT) and decoder (GPT-2, Llama) models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from transformer.models import context_parallel, kernels
from transformer.models.attention import KVCache, make_attention_mask
from transformer.models.blocks import LayerStack
from transformer.models.common import dropout, dtype_of, param, split_rng
from transformer.models.config import ModelConfig
from transformer.models.layers import ACTIVATION_FNS, Embeddings, Norm
from transformer.sharding import constrain


@struct.dataclass
class ModelOutput:
    """What a forward pass returns; fields a model does not compute are None."""

    last_hidden_state: jax.Array  # [batch, length, hidden]
    logits: jax.Array | None = None  # [batch, length, vocab], float32
    pooler_output: jax.Array | None = None  # [batch, hidden] (BERT pooler)
    attentions: jax.Array | None = None  # [layers, batch, heads, queries, keys], float32
    cache: KVCache | list[KVCache] | None = None  # Per layer: see `Decoder.init_cache`.
    # Mixture of experts: per-layer router sums [layers, ...] (`transformer.models.moe`).
    router_stats: dict[str, jax.Array] | None = None


def _segments_and_positions(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Segment ids (0 = padding) from packed ids or a 0/1 attention mask; positions 0..T-1."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)


class Encoder(nnx.Module):
    """A bidirectional Transformer encoder (BERT): embeddings, post-LN blocks, pooler, MLM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        self.embeddings = Embeddings(config, rngs=rngs)
        if config.embedding_norm:
            self.embedding_norm = Norm(config, rngs=rngs)
        self.layers = LayerStack(config, rngs=rngs)
        if config.final_norm:
            self.final_norm = Norm(config, rngs=rngs)
        if config.pooler:
            self.pooler = param(rngs, (d, d), ("embed", "mlp"), std=std, dtype=pd)
            self.pooler_bias = param(rngs, (d,), ("mlp",), dtype=pd)
        if config.mlm_head:
            self.mlm_dense = param(rngs, (d, d), ("embed", "mlp"), std=std, dtype=pd)
            self.mlm_dense_bias = param(rngs, (d,), ("mlp",), dtype=pd)
            self.mlm_norm = Norm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(rngs, (d, config.vocab_size), ("embed", "vocab"), std=std, dtype=pd)
        self.lm_bias = param(rngs, (config.vocab_size,), ("vocab",), dtype=pd)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        output_attentions: bool = False,
        compute_logits: bool = True,
        inputs_embeds: jax.Array | None = None,
    ) -> ModelOutput:
        """`inputs_embeds` [batch, length, hidden] replace the token embeddings of `input_ids`
        (which still give the shape); positions, token types and the embedding norm follow."""
        cfg = self.config
        segments, positions = _segments_and_positions(
            input_ids, attention_mask, segment_ids, positions
        )
        embed_rng, stack_rng = split_rng(dropout_rng, 2)
        x = self.embeddings(input_ids, positions, token_type_ids, inputs_embeds)
        if cfg.embedding_norm:
            x = self.embedding_norm(x)
        x = dropout(x, cfg.dropout_rate, embed_rng)
        if context_parallel.active() or kernels.is_fused(cfg.attention_impl):
            mask = context_parallel.layout(cfg, segments, positions, causal=False)
            kernels.check_rows(cfg.attention_impl, mask.segment_ids)
        else:
            mask = make_attention_mask(segments, segments, causal=False)
        x, _, weights, _ = self.layers(
            x, mask=mask, positions=positions, dropout_rng=stack_rng,
            return_weights=output_attentions,
        )
        if cfg.final_norm:
            x = self.final_norm(x)
        pooled = self.pool(x[:, 0]) if cfg.pooler else None
        logits = self.mlm_logits(x) if compute_logits else None
        return ModelOutput(x, logits=logits, pooler_output=pooled, attentions=weights)

    def pool(self, first_token_states: jax.Array) -> jax.Array:
        """BERT's pooler: dense + tanh on the states of the sequences' first ([CLS]) tokens."""
        dtype = dtype_of(self.config.dtype)
        h = first_token_states.astype(dtype)
        return jnp.tanh(h @ self.pooler[...].astype(dtype) + self.pooler_bias[...].astype(dtype))

    def mlm_logits(self, x: jax.Array) -> jax.Array:
        """Masked-LM logits (float32): transform (dense, activation, norm), then the output layer."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        if cfg.mlm_head:
            h = x @ self.mlm_dense[...].astype(dtype) + self.mlm_dense_bias[...].astype(dtype)
            x = self.mlm_norm(ACTIVATION_FNS[cfg.activation](h))
        if cfg.tie_embeddings:
            logits = self.embeddings.attend(x)
        else:
            logits = constrain(x @ self.lm_head[...].astype(dtype), ("batch", "length", "act_vocab"))
        return (logits + self.lm_bias[...].astype(dtype)).astype(jnp.float32)


class Decoder(nnx.Module):
    """A causal Transformer decoder (GPT-2, Llama): embeddings, pre-LN blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = LayerStack(config, rngs=rngs)
        if config.final_norm:
            self.final_norm = Norm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(rngs, (d, config.vocab_size), ("embed", "vocab"), std=std, dtype=pd)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        cache_segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        output_attentions: bool = False,
        compute_logits: bool = True,
        inputs_embeds: jax.Array | None = None,
    ) -> ModelOutput:
        """`inputs_embeds` [batch, length, hidden] replace the token embeddings of `input_ids`.
        With a `cache`, the tokens are written at `cache_index` and attend to the cache slots
        whose `cache_segment_ids` [batch, max_length] match theirs (0 = empty slot)."""
        cfg = self.config
        segments, positions = _segments_and_positions(
            input_ids, attention_mask, segment_ids, positions
        )
        embed_rng, stack_rng = split_rng(dropout_rng, 2)
        x = self.embeddings(input_ids, positions, token_type_ids, inputs_embeds)
        x = dropout(x, cfg.dropout_rate, embed_rng)
        if cache is None and (context_parallel.active() or kernels.is_fused(cfg.attention_impl)):
            # Segment ids and positions instead of a mask; the tokens may be laid out zig-zag.
            mask = context_parallel.layout(cfg, segments, positions, causal=True)
            kernels.check_rows(cfg.attention_impl, mask.segment_ids)
        elif cache is None:
            mask = make_attention_mask(segments, segments, causal=True, window=cfg.sliding_window)
        else:
            if cache_segment_ids is None:
                raise ValueError("decoding with a cache needs cache_segment_ids [batch, max_length]")
            mask = make_attention_mask(segments, cache_segment_ids, causal=True,
                                       query_offset=cache_index, window=cfg.sliding_window)
        x, cache, weights, stats = self.layers(
            x, mask=mask, positions=positions, cache=cache, cache_index=cache_index,
            dropout_rng=stack_rng, return_weights=output_attentions, token_mask=segments > 0,
        )
        if cfg.final_norm:
            x = self.final_norm(x)
        logits = self.lm_logits(x) if compute_logits else None
        return ModelOutput(x, logits=logits, attentions=weights, cache=cache, router_stats=stats)

    def lm_logits(self, x: jax.Array) -> jax.Array:
        """Next-token logits (float32) from final hidden states."""
        if self.config.tie_embeddings:
            logits = self.embeddings.attend(x)
        else:
            dtype = dtype_of(self.config.dtype)
            logits = constrain(x.astype(dtype) @ self.lm_head[...].astype(dtype),
                               ("batch", "length", "act_vocab"))
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, max_length: int) -> KVCache | list[KVCache]:
        """An empty KV cache for every layer, in the layout of the layer stack: one cache
        [layers, batch, kv_heads, max_length, head_dim] or (`LayerList`) a list of caches."""
        return self.layers.init_cache(batch, max_length)
