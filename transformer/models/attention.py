"""Scaled dot-product attention, its masks, and multi-head (grouped-query) attention.

Q = X·W_Q, K = X·W_K, V = X·W_V;  S = Q·Kᵀ;  A = softmax(S / √d_k);  Y = A·V.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from transformer.models import context_parallel, kernels, lora
from transformer.models import positions as pos
from transformer.models.common import dropout, dtype_of, param
from transformer.models.config import ModelConfig
from transformer.models.masks import segment_mask
from transformer.sharding import constrain


def make_attention_mask(
    query_segment_ids: jax.Array,
    key_segment_ids: jax.Array,
    *,
    causal: bool,
    query_offset: jax.Array | int = 0,
    window: int | None = None,
) -> jax.Array:
    """Boolean mask [batch, 1, queries, keys]; True where a query may attend to a key.

    Segment ids give padding (0) and packing (a token attends only inside its own segment).
    Padding queries attend to every real key, as in the BERT and GPT-2 reference implementations:
    their outputs are never used as such, but they stay finite and equal to those references'
    (extractive QA takes a softmax over all positions, padding included).
    With `causal`, query i (at sequence index `query_offset + i`) sees keys 0..that index; with a
    `window` too, only the last `window` of them (sliding-window attention, as in Mistral).
    """
    q_index = (query_offset + jnp.arange(query_segment_ids.shape[1]))[None, :]
    k_index = jnp.arange(key_segment_ids.shape[1])[None, :]
    return segment_mask(query_segment_ids, key_segment_ids, q_index, k_index, causal=causal,
                        window=window)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: str = "einsum",
    heads_first: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Attention of query [B,T,H,D] over key/value [B,S,K,D] (or [B,K,S,D] with `heads_first`,
    the KV-cache layout), K dividing H (grouped-query).

    `impl='einsum'` is the textbook computation (softmax in float32); `impl='xla'` calls
    `jax.nn.dot_product_attention` with its default implementation, XLA's own fused attention
    (the fused kernels, `transformer.models.kernels`, take segment ids instead of a mask). Attention
    dropout and returning the weights need the explicit weights, so they use the einsum path.
    `bias` [B or 1, H, T, S] is added to the logits (T5's relative positions); `scale` multiplies
    them (default 1/√D; T5 uses 1).
    Returns the output [B,T,H,D] and the weights [B,H,T,S] (float32) when asked for.
    """
    batch, q_len, heads, depth = query.shape
    kv = "bksd" if heads_first else "bskd"
    kv_heads, kv_len = (key.shape[1], key.shape[2]) if heads_first else (key.shape[2], key.shape[1])
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    training_dropout = dropout_rate > 0.0 and dropout_rng is not None
    if kernels.is_fused(impl):  # They take segment ids (a TokenLayout), not a dense mask.
        kernels.check_supported(impl, bias=bias is not None, dropout=training_dropout,
                                return_weights=return_weights, dense_mask=True)
    if impl == "xla" and not (training_dropout or return_weights or heads_first):
        bias = None if bias is None else bias.astype(query.dtype)
        out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale)
        return out, None
    if impl not in ("einsum", "xla"):
        raise ValueError(f"attention impl {impl!r} is not one of ['einsum', 'xla']")

    groups = heads // kv_heads
    # Grouped queries share a key head; without groups the plain products avoid the reshapes
    # (each a layout copy of the [B, H, T, S] scores on some backends).
    q_spec, s_spec = ("btkd", "bkts") if groups == 1 else ("btkgd", "bkgts")
    grouped = query if groups == 1 else query.reshape(batch, q_len, kv_heads, groups, depth)
    scores = jnp.einsum(
        f"{q_spec},{kv}->{s_spec}", grouped, key, preferred_element_type=jnp.float32
    ).reshape(batch, heads, q_len, kv_len)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    probs = dropout(weights, dropout_rate, dropout_rng).astype(value.dtype)
    if groups > 1:
        probs = probs.reshape(batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum(f"{s_spec},{kv}->{q_spec}", probs, value).reshape(batch, q_len, heads, depth)
    return out, weights if return_weights else None


@struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far: [batch, kv_heads, max_length, head_dim].

    Heads before positions: the attention products then batch over (batch, heads) as stored,
    where the [batch, length, heads] layout of activations would be transposed, the whole
    cache, for every generated token.
    """

    key: jax.Array
    value: jax.Array

    AXES = ("batch", "act_heads", "length", None)  # Logical axes, for sharding.

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_length: int) -> KVCache:
        shape = (batch, config.kv_heads, max_length, config.dim_per_head)
        zeros = lambda: constrain(jnp.zeros(shape, dtype_of(config.dtype)), cls.AXES)
        return cls(zeros(), zeros())


class MultiHeadAttention(nnx.Module):
    """h heads: project, split, attend, concatenate, project back; `num_kv_heads` for GQA/MQA."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, k, hd = config.hidden_size, config.num_heads, config.kv_heads, config.dim_per_head
        std, pd = config.initializer_range, config.param_dtype
        out_std = std / math.sqrt(2 * config.num_layers) if config.scale_residual_init else std
        self.query = param(rngs, (d, h, hd), ("embed", "heads", "kv"), std=std, dtype=pd)
        self.key = param(rngs, (d, k, hd), ("embed", "heads", "kv"), std=std, dtype=pd)
        self.value = param(rngs, (d, k, hd), ("embed", "heads", "kv"), std=std, dtype=pd)
        self.out = param(rngs, (h, hd, d), ("heads", "kv", "embed"), std=out_std, dtype=pd)
        if config.attention_bias:
            self.query_bias = param(rngs, (h, hd), ("heads", "kv"), dtype=pd)
            self.key_bias = param(rngs, (k, hd), ("heads", "kv"), dtype=pd)
            self.value_bias = param(rngs, (k, hd), ("heads", "kv"), dtype=pd)
            self.out_bias = param(rngs, (d,), ("embed",), dtype=pd)
        embed = lora.Side((d,), ("embed",))
        q_heads, kv_heads = lora.Side((h, hd), ("heads", "kv")), lora.Side((k, hd), ("heads", "kv"))
        self.query_lora = lora.adapter(config, "query", embed, q_heads, rngs)
        self.key_lora = lora.adapter(config, "key", embed, kv_heads, rngs)
        self.value_lora = lora.adapter(config, "value", embed, kv_heads, rngs)
        self.out_lora = lora.adapter(config, "out", q_heads, embed, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | context_parallel.TokenLayout | None,
        positions: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        return_weights: bool = False,
        bias: jax.Array | None = None,
        memory: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        """x [B,T,embed] → ([B,T,embed], updated cache, weights [B,H,T,S] or None).

        With a cache, the new keys/values are written at `cache_index` and the queries attend
        over the whole cache; the caller's mask says which cache slots are valid. With `memory`
        (cross-attention: `project_memory` of the encoder's states), the queries attend over
        those keys and values instead, and `cache` is returned untouched. `bias` [B,H,T,S] is
        added to the logits.
        """
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        x = x.astype(dtype)
        lora_rngs = lora.dropout_rngs(cfg, dropout_rng, 4)
        q = self._project(x, "query", lora_rngs[0])
        if memory is None:
            k, v = self._project(x, "key", lora_rngs[1]), self._project(x, "value", lora_rngs[2])
            if cfg.position == "rope":
                inv_freq = pos.rope_inverse_frequencies(cfg)
                q = pos.apply_rope(q, positions, inv_freq, pos.rope_position_scale(cfg))
                k = pos.apply_rope(k, positions, inv_freq, pos.rope_position_scale(cfg))
            k = constrain(k, ("batch", "length", "act_heads", None))
            v = constrain(v, ("batch", "length", "act_heads", None))
        q = constrain(q, ("batch", "length", "act_heads", None))

        if memory is not None:
            k, v = memory.key, memory.value
        elif cache is not None:
            write = lambda stored, new: jax.lax.dynamic_update_slice(
                stored, new.swapaxes(1, 2).astype(stored.dtype), (0, 0, cache_index, 0))
            cache = KVCache(write(cache.key, k), write(cache.value, v))
            k, v = cache.key, cache.value

        impl = cfg.attention_impl
        if cache is not None and kernels.is_fused(impl):
            # Decoding steps attend a few queries over the cache: no T × T scores to avoid.
            impl = "xla"
        if isinstance(mask, context_parallel.TokenLayout) and kernels.is_fused(impl):
            if context_parallel.active():
                raise ValueError(
                    f"attention_impl={impl!r} does not combine with context parallelism yet (ring "
                    "attention computes its blocks itself); set model.attention_impl='xla' with a "
                    "'context' mesh axis, or mesh.context=1 for the kernel")
            kernels.check_supported(
                impl, bias=bias is not None, return_weights=return_weights,
                dropout=cfg.attention_dropout_rate > 0 and dropout_rng is not None)
            y, weights = kernels.attention(
                q, k, v, mask.segment_ids, causal=mask.causal, window=mask.window,
                scale=1.0 / math.sqrt(cfg.dim_per_head) if cfg.scaled_attention else 1.0,
                impl=impl), None
        elif isinstance(mask, context_parallel.TokenLayout):  # The sequence split over devices.
            if bias is not None or not cfg.scaled_attention:
                raise ValueError("context parallelism supports scaled attention without a "
                                 "position bias (not T5's relative bias); use a mesh without "
                                 "a context axis for this model")
            context_parallel.check_supported(
                return_weights, cfg.attention_dropout_rate > 0 and dropout_rng is not None)
            y, weights = context_parallel.attention(q, k, v, mask, cfg.context_parallel), None
        else:
            y, weights = dot_product_attention(
                q, k, v, mask,
                impl=impl,
                heads_first=cache is not None or memory is not None,
                dropout_rate=cfg.attention_dropout_rate,
                dropout_rng=dropout_rng,
                return_weights=return_weights,
                bias=bias,
                scale=None if cfg.scaled_attention else 1.0,
            )
        y = constrain(y, ("batch", "length", "act_heads", None))
        out = jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(dtype))
        out = lora.apply(self.out_lora, y, out, lora_rngs[3])
        if cfg.attention_bias:
            out = out + self.out_bias[...].astype(dtype)
        return constrain(out, ("batch", "length", "act_embed")), cache, weights

    def _project(self, x: jax.Array, name: str, lora_rng: jax.Array | None) -> jax.Array:
        """x [B,T,embed] through the 'query', 'key' or 'value' projection (+ bias, + LoRA)."""
        dtype = dtype_of(self.config.dtype)
        y = jnp.einsum("btd,dhk->bthk", x, getattr(self, name)[...].astype(dtype))
        y = lora.apply(getattr(self, f"{name}_lora"), x, y, lora_rng)
        if self.config.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
        return y

    def project_memory(self, memory: jax.Array) -> KVCache:
        """Cross-attention keys and values of `memory` [B,S,embed] (an encoder's final states),
        in the cache layout [B, kv_heads, S, head_dim]: computed once per input when decoding."""
        memory = memory.astype(dtype_of(self.config.dtype))
        heads_first = lambda a: constrain(a.swapaxes(1, 2), KVCache.AXES)
        key, value = (self._project(memory, name, None) for name in ("key", "value"))
        return KVCache(heads_first(key), heads_first(value))
