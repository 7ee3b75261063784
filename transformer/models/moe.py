"""Mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE): a float32 router picks the top-k
of E gated MLPs for each token; an optional shared expert, gated by a sigmoid, sees every token.

Two executions of the same function:
  dropless  tokens sorted by expert, one grouped matrix product per weight (`jax.lax.ragged_dot`),
            unsorted and combined with their routing weights: no token is dropped, no padding.
  dense     every expert on every token, masked by the routing weights: the reference for tests.

On a mesh with an 'expert' axis, the tokens reach the experts' devices through XLA's SPMD
partitioner (`moe_dispatch='partitioner'`) or an explicit all-to-all in `shard_map`
(`'all_to_all'`, transformer/models/expert_parallel.py). With `moe_capacity_factor` > 0 each
expert takes a bounded number of pairs per sequence and the rest are dropped (counted).

The block also returns per-layer router statistics (top-k assignments and probability mass per
expert, the z-loss sum, over real tokens only): the decoder carries them out of the layer scan
and the objective turns them into the load-balancing loss and the router z-loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.models.common import dtype_of, param
from transformer.models.config import ModelConfig
from transformer.models.expert_parallel import all_to_all_experts, grouped_mlp
from transformer.models.layers import ACTIVATION_FNS
from transformer.sharding import constrain

RouterStats = dict[str, jax.Array]


def route(logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(softmax probabilities [N, E], top-k weights [N, k], top-k expert ids [N, k]) from float32
    router logits: softmax first, then top-k (ties go to the lower expert id), renormalized to
    sum 1 when asked (Mixtral) or left as probabilities (Qwen2-MoE `norm_topk_prob=False`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def router_stats(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                 token_mask: jax.Array) -> RouterStats:
    """Sums over the real tokens (`token_mask` 1) of one layer, from which the losses follow."""
    mask = token_mask.astype(jnp.float32)
    num_experts = probs.shape[-1]
    assigned = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return {
        "expert_tokens": jnp.einsum("n,ne->e", mask, assigned),
        "expert_probs": jnp.einsum("n,ne->e", mask, probs),
        "router_z_sum": jnp.sum(mask * z * z),
        "tokens": jnp.sum(mask),
    }


def expert_capacity(length: int, top_k: int, num_experts: int, factor: float) -> int:
    """(token, choice) pairs one expert takes from a sequence of `length` tokens: `factor` times
    its share of a perfectly balanced load, at least 1."""
    return max(1, math.ceil(factor * length * top_k / num_experts))


def capacity_keep(experts: jax.Array, token_mask: jax.Array, capacity: int,
                  num_experts: int) -> jax.Array:
    """Which (token, choice) pairs of experts [batch, length, k] each expert takes, at most
    `capacity` per sequence: all first choices before any second one, earlier positions first
    (GShard's priority), so the same pairs drop on any mesh. Padding (`token_mask` 0) is never
    taken and uses no capacity."""
    batch, length, k = experts.shape
    chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * (
        token_mask.astype(jnp.int32)[..., None, None])
    in_priority = chosen.transpose(0, 2, 1, 3).reshape(batch, k * length, num_experts)
    rank = jnp.sum((jnp.cumsum(in_priority, axis=1) - 1) * in_priority, axis=-1)
    rank = rank.reshape(batch, k, length).transpose(0, 2, 1)
    return (rank < capacity) & (token_mask[..., None] > 0)


def dropped_fraction(stats: RouterStats) -> jax.Array:
    """The share of the real tokens' (token, choice) pairs dropped over capacity, all layers."""
    return jnp.sum(stats["dropped"]) / jnp.maximum(jnp.sum(stats["expert_tokens"]), 1.0)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch-Transformer load balance as transformers computes it for Mixtral: the fractions of
    top-k assignments and of router probability per expert, each pooled over every layer's real
    tokens, multiplied and summed, times E. A perfectly balanced router scores top_k."""
    rows = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
    tokens = jnp.sum(stats["expert_tokens"].reshape(-1, stats["expert_tokens"].shape[-1]), 0)
    probs = jnp.sum(stats["expert_probs"].reshape(-1, stats["expert_probs"].shape[-1]), 0)
    return tokens.shape[-1] * jnp.sum((tokens / rows) * (probs / rows))


def router_z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE router z-loss: the mean over layers' real tokens of logsumexp(router logits)²."""
    return jnp.sum(stats["router_z_sum"]) / jnp.maximum(jnp.sum(stats["tokens"]), 1.0)


def _gated(h: jax.Array, gate: jax.Array | None, act) -> jax.Array:
    return act(h) if gate is None else act(h) * gate


def dropless_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, wi: jax.Array,
                     wi_gate: jax.Array | None, wo: jax.Array, act) -> jax.Array:
    """Σ_k weights[n, k] · expert_{experts[n, k]}(x[n]) with every (token, choice) pair sorted by
    expert and each weight applied once as a grouped product over the sorted rows. An expert id
    of E (a dropped pair) sorts last, past every group: it contributes nothing."""
    n, k = experts.shape
    num_experts = wi.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # Rows grouped by expert, in token order within one.
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    y = grouped_mlp(x[order // k], group_sizes, wi, wi_gate, wo, act)
    y = y[jnp.argsort(order)]  # Back to (token, choice) order.
    y = y.reshape(n, k, -1) * weights.astype(y.dtype)[..., None]
    return jnp.sum(y, axis=1)


def dense_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, wi: jax.Array,
                  wi_gate: jax.Array | None, wo: jax.Array, act) -> jax.Array:
    """The same sum with every expert applied to every token, then masked: E times the FLOPs."""
    combine = jnp.einsum("nk,nke->ne", weights,
                         jax.nn.one_hot(experts, wi.shape[0], dtype=weights.dtype))
    h = jnp.einsum("nd,edf->nef", x, wi)
    gate = None if wi_gate is None else jnp.einsum("nd,edf->nef", x, wi_gate)
    y = jnp.einsum("nef,efd->ned", _gated(h, gate, act), wo)
    return jnp.einsum("ne,ned->nd", combine.astype(y.dtype), y)


EXPERT_IMPLS = {"dropless": dropless_experts, "dense": dense_experts}


class MoEMLP(nnx.Module):
    """Router, E experts ([experts, ...] stacked weights on the 'expert' axis) and the optional
    shared expert. Parameter names match the dense `MLP` where they mean the same."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f, e = config.hidden_size, config.expert_dim, config.num_experts
        std, pd = config.initializer_range, config.param_dtype
        out_std = std / math.sqrt(2 * config.num_layers) if config.scale_residual_init else std
        self.router = param(rngs, (d, e), ("embed", None), std=std, dtype=pd)
        self.wi = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=std, dtype=pd)
        if config.gated_mlp:
            self.wi_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=std, dtype=pd)
        self.wo = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std=out_std, dtype=pd)
        s = config.moe_shared_expert_dim
        if s:
            self.shared_wi = param(rngs, (d, s), ("embed", "mlp"), std=std, dtype=pd)
            if config.gated_mlp:
                self.shared_wi_gate = param(rngs, (d, s), ("embed", "mlp"), std=std, dtype=pd)
            self.shared_wo = param(rngs, (s, d), ("mlp", "embed"), std=out_std, dtype=pd)
            self.shared_gate = param(rngs, (d, 1), ("embed", None), std=std, dtype=pd)

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 ) -> tuple[jax.Array, RouterStats]:
        """x [batch, length, embed] → (output, router statistics); `token_mask` [batch, length]
        is 1 on real tokens (padding is routed but not counted in the statistics)."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        act = ACTIVATION_FNS[cfg.activation]
        batch, length, d = x.shape
        flat = x.reshape(batch * length, d).astype(dtype)
        # Router in float32: bfloat16 logits flip near-tied top-k choices.
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        probs, weights, experts = route(logits, cfg.num_experts_per_token, cfg.moe_renormalize)
        mask = jnp.ones((batch * length,)) if token_mask is None else token_mask.reshape(-1)
        stats = router_stats(logits, probs, experts, mask)
        k = cfg.num_experts_per_token
        capacity = (expert_capacity(length, k, cfg.num_experts, cfg.moe_capacity_factor)
                    if cfg.moe_capacity_factor else None)
        weights, experts, stats["dropped"] = self._drop_over_capacity(weights, experts, mask,
                                                                      (batch, length), capacity)
        get = lambda name: getattr(self, name)[...].astype(dtype) if hasattr(self, name) else None
        args = (weights.astype(dtype), experts, get("wi"), get("wi_gate"), get("wo"), act)
        y = None
        if cfg.moe_dispatch == "all_to_all":  # None: the tokens are not split over 'expert'.
            y = all_to_all_experts(flat.reshape(batch, length, d),
                                   *(a.reshape(batch, length, k) for a in args[:2]), *args[2:],
                                   expert_capacity=capacity)
        if y is None:
            y = EXPERT_IMPLS[cfg.moe_impl](flat, *args)
        y = y.reshape(batch * length, d)
        if cfg.moe_shared_expert_dim:
            h = _gated(flat @ get("shared_wi"),
                       None if get("shared_wi_gate") is None else flat @ get("shared_wi_gate"), act)
            shared_gate = jax.nn.sigmoid(flat @ get("shared_gate"))
            y = y + shared_gate * (h @ get("shared_wo"))
        y = y.reshape(batch, length, d)
        return constrain(y, ("batch", "length", "act_embed")), stats

    def _drop_over_capacity(self, weights, experts, mask, shape, capacity):
        """(weights, expert ids with E for dropped pairs, the real pairs dropped); `capacity`
        None: dropless."""
        if capacity is None:
            return weights, experts, jnp.zeros((), jnp.float32)
        k, e = experts.shape[-1], self.config.num_experts
        keep = capacity_keep(experts.reshape(*shape, k), mask.reshape(shape), capacity,
                             e).reshape(-1, k)
        dropped = jnp.sum(mask[:, None] * (~keep))
        return weights * keep, jnp.where(keep, experts, e), dropped.astype(jnp.float32)
