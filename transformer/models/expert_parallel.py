"""Experts run on rows grouped by expert, and the explicit expert-parallel dispatch.

`grouped_mlp` is the expert computation both dispatches share: one grouped matrix product per
weight (`jax.lax.ragged_dot`) over rows sorted by expert.

`all_to_all_experts` (`moe_dispatch='all_to_all'`) moves the tokens itself, in `jax.shard_map`,
where the partitioner path leaves it to XLA's SPMD partitioner. Each device of the 'expert' mesh
axes holds E / n whole experts and a share of the batch. It routes its own tokens, sorts the
(token, choice) pairs by expert (so by the device that owns the expert) and packs them into a
fixed-capacity send buffer [n, capacity, embed] with the counts per expert; one
`jax.lax.all_to_all` delivers each device the rows for its experts, which it groups by local
expert and runs with `grouped_mlp`; the reverse all-to-all returns the results to where the rows
came from, which unsorts them and sums the top-k choices with their routing weights.

The buffer is sized for the worst case (every local pair to one device) unless capacity-factor
dropping bounds it, so no pair is ever lost. `ragged_all_to_all`, which would send only the rows
present, is not implemented by XLA:CPU ("HLO opcode `ragged-all-to-all` is not supported"), so
the portable fixed-capacity exchange is used. Only logical axis names appear here: the mesh axes
come from the active rules (`transformer.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from transformer import sharding


def grouped_mlp(rows: jax.Array, group_sizes: jax.Array, wi: jax.Array, wi_gate: jax.Array | None,
                wo: jax.Array, act: Callable) -> jax.Array:
    """Expert g's gated MLP on its `group_sizes[g]` consecutive rows; rows past the groups' sum
    (padding) come out zero."""
    h = act(jax.lax.ragged_dot(rows, wi, group_sizes))
    if wi_gate is not None:
        h = h * jax.lax.ragged_dot(rows, wi_gate, group_sizes)
    return jax.lax.ragged_dot(h, wo, group_sizes)


def send_capacity(local_tokens: int, top_k: int, local_experts: int, local_rows: int,
                  expert_capacity: int | None) -> int:
    """The most (token, choice) pairs one device can send to another: each token's top-k experts
    differ, so at most min(top_k, E_local) of them live on one device; with dropping, each of
    those experts takes at most `expert_capacity` pairs per sequence (row)."""
    worst = local_tokens * min(top_k, local_experts)
    if expert_capacity is None:
        return worst
    return min(worst, local_rows * local_experts * expert_capacity)


def all_to_all_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, wi: jax.Array,
                       wi_gate: jax.Array | None, wo: jax.Array, act: Callable,
                       expert_capacity: int | None = None, buffer_rows: int | None = None,
                       ) -> jax.Array | None:
    """Σ_k weights · expert_{experts}(x) for x [batch, length, embed], weights / experts [batch,
    length, k] (an expert id of E marks a dropped pair), with the experts [E, ...] split over the
    active 'expert' mesh axes. `expert_capacity`: the pairs one expert takes per sequence when
    dropping (None: dropless). `buffer_rows`: rows each device sends each other one (default: the
    most that can go there; less is refused, since rows over it would be lost).

    Returns None when the tokens are not split over the expert axes (a batch they do not divide,
    as in decoding one sequence): the caller then lets the partitioner move them.
    """
    num_experts = wi.shape[0]
    expert_axes = sharding.active_mesh_axes("expert")
    devices = math.prod(expert_axes.values())
    if num_experts % devices:
        raise ValueError(
            f"{num_experts} experts do not split over the {devices} devices of mesh axes "
            f"{tuple(expert_axes)}; use an expert axis size that divides num_experts={num_experts}")
    token_spec = sharding.active_spec(("batch", "length", "act_embed"), x.shape)
    if token_spec is None or not set(expert_axes) <= {*_axes(token_spec[0]), *_axes(token_spec[1])}:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    local_batch = x.shape[0] // math.prod(mesh.shape[a] for a in _axes(token_spec[0]))
    local_length = x.shape[1] // math.prod(mesh.shape[a] for a in _axes(token_spec[1]))
    needed = send_capacity(local_batch * local_length, experts.shape[-1], num_experts // devices,
                           local_batch, expert_capacity)
    if buffer_rows is None:
        buffer_rows = needed
    elif buffer_rows < needed:
        hint = ("" if expert_capacity else
                ", or set moe_capacity_factor > 0 to drop the pairs over each expert's capacity")
        raise ValueError(
            f"an all-to-all buffer of {buffer_rows} rows per device pair can overflow: up to "
            f"{needed} (token, choice) pairs of one device can go to another; use at least "
            f"{needed} rows{hint}")
    # Without expert axes (one expert device) the exchanges are the identity, but the sort and
    # the buffer stay per device, as sized.
    axes = tuple(expert_axes)
    pair_spec = PartitionSpec(*token_spec[:2], None)
    weight_spec = PartitionSpec(axes or None, None, None)

    def local(x, weights, experts, wi, wi_gate, wo):
        return _local_experts(x, weights, experts, wi, wi_gate, wo, act, axes, devices,
                              buffer_rows)

    return jax.shard_map(
        local, in_specs=(token_spec, pair_spec, pair_spec, weight_spec,
                         None if wi_gate is None else weight_spec, weight_spec),
        out_specs=token_spec)(x, weights, experts, wi, wi_gate, wo)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _local_experts(x, weights, experts, wi, wi_gate, wo, act, axes, devices, capacity):
    """One device's share: its tokens out to the experts' devices, its experts on what arrives,
    the results back. With `devices` 1 the exchanges are the identity."""
    batch, length, d = x.shape
    k = experts.shape[-1]
    local_experts = wi.shape[0]
    num_experts = local_experts * devices
    exchange = ((lambda a: a) if devices == 1 else
                (lambda a: jax.lax.all_to_all(a, axes, 0, 0, tiled=True)))
    rows = x.reshape(batch * length, d)
    flat = experts.reshape(-1)
    pairs = flat.shape[0]
    # Pairs sorted by expert are sorted by destination device; dropped ones (id E) come last.
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    per_expert = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    per_device = per_expert.reshape(devices, local_experts).sum(axis=1)
    kept = sorted_experts < num_experts
    destination = jnp.where(kept, sorted_experts // local_experts, devices)
    first = jnp.cumsum(per_device) - per_device
    slot = jnp.arange(pairs) - first[jnp.minimum(destination, devices - 1)]
    send = jnp.zeros((devices, capacity, d), x.dtype).at[destination, slot].set(
        rows[order // k], mode="drop")
    received = exchange(send)  # [source device, capacity, embed]
    counts = exchange(per_expert.reshape(devices, local_experts))  # [source, local expert]
    # Row j of source s belongs to local expert g when it lies in g's run of s's counts; rows
    # past the counts are padding (group id E_local: sorted last, they come out zero).
    ends = jnp.cumsum(counts, axis=1)
    group = jnp.sum(jnp.arange(capacity)[None, :, None] >= ends[:, None, :], axis=-1)
    by_group = jnp.argsort(group.reshape(-1), stable=True)
    out = grouped_mlp(received.reshape(-1, d)[by_group], counts.sum(axis=0), wi, wi_gate, wo, act)
    out = jnp.zeros_like(out).at[by_group].set(out).reshape(devices, capacity, d)
    returned = exchange(out)  # [destination device, capacity, embed], as sent.
    y = returned.at[destination, slot].get(mode="fill", fill_value=0)
    y = jnp.zeros_like(y).at[order].set(y)  # Back to (token, choice) order.
    y = y.reshape(batch * length, k, d) * weights.reshape(-1, k, 1).astype(y.dtype)
    return jnp.sum(y, axis=1).reshape(batch, length, d)
