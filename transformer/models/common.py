"""Shared building blocks: parameters with logical axes, dtypes and initializers."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    std: float | None = None,
    value: float = 0.0,
    dtype: str = "float32",
) -> nnx.Param:
    """A parameter named by logical axes: normal(0, std) when `std` is given, else constant.

    Sharding is applied by the caller (`transformer.sharding`), never eagerly here, so a model
    builds the same way on one device, inside `jax.eval_shape`, and under a mesh.
    """
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names: {axes}")
    if std is None:
        array = jnp.full(shape, value, dtype_of(dtype))
    else:
        array = std * jax.random.normal(rngs.params(), shape, dtype_of(dtype))
    return nnx.Param(array, out_sharding=tuple(axes), eager_sharding=False)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (evaluation) or the rate is zero."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if rng is None else list(jax.random.split(rng, n))
