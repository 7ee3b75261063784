"""LoRA adapters (Hu et al., 2021): a frozen weight W plus a trainable low-rank update.

    y = x·W + (α / r) · dropout(x)·A·B,   A: [in, r] (random), B: [r, out] (zeros)

so at initialization the adapted model computes the base model's function (B = 0). A weight of
ours may span several axes on each side (the query projection is [embed | heads, head_dim], the output
projection [heads, head_dim | embed]); A takes the input axes and B the output axes, and each
factor keeps the logical axes (hence the sharding) of the side it replaces. The factors are
`nnx.LoRAParam`s, a kind of `nnx.Param`: they live in the same state tree, are stacked over
layers under scan like every block parameter, and are told apart by the `_lora` in their path.

Flax's own `nnx.LoRA` wraps a two-dimensional `[in, out]` kernel only, and knows no logical axes:
hence this small module. `merge` folds the update into W (W + (α/r)·A·B) for export or serving.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.models.common import dropout, dtype_of
from transformer.models.config import ModelConfig

SUFFIX = "_lora"  # Attribute (and path element) of the adapter of weight `w`: `w_lora`.


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of an adapted weight: its shape and logical axes."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


class LoRA(nnx.Module):
    """The low-rank update of one weight whose input axes are `inputs` and output axes `outputs`."""

    def __init__(self, config: ModelConfig, inputs: Side, outputs: Side, *, rngs: nnx.Rngs):
        r = config.lora_rank
        self.scale = lora_scale(config)
        self.rate = config.lora_dropout
        self.dtype = dtype_of(config.dtype)
        fan_in = math.prod(inputs.shape)
        # As peft (torch's kaiming_uniform with a = √5 on lora_A): U(-1/√fan_in, 1/√fan_in).
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), (*inputs.shape, r), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(dtype_of(config.param_dtype)),
                               out_sharding=(*inputs.axes, None), eager_sharding=False)
        b = jnp.zeros((r, *outputs.shape), dtype_of(config.param_dtype))
        self.b = nnx.LoRAParam(b, out_sharding=(None, *outputs.axes), eager_sharding=False)
        self.num_inputs = len(inputs.shape)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """The update for input `x` [..., *inputs] → [..., *outputs]."""
        x = dropout(x.astype(self.dtype), self.rate, dropout_rng)
        n = self.num_inputs
        low = jax.lax.dot_general(x, self.a[...].astype(self.dtype),
                                  ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
        b = self.b[...].astype(self.dtype)
        out = jax.lax.dot_general(low * self.scale, b, (((low.ndim - 1,), (0,)), ((), ())))
        return out.astype(self.dtype)


def lora_scale(config: ModelConfig) -> float:
    """α / r, or α / √r with rank-stabilized LoRA (Kalajdzievski, 2023)."""
    r = config.lora_rank
    return config.lora_alpha / (math.sqrt(r) if config.lora_rslora else r)


def adapter(config: ModelConfig, name: str, inputs: Side, outputs: Side,
            rngs: nnx.Rngs) -> LoRA | None:
    """The adapter of weight `name` when the config targets it, else None."""
    if config.lora_rank <= 0 or name not in config.lora_targets:
        return None
    return LoRA(config, inputs, outputs, rngs=rngs)


def dropout_rngs(config: ModelConfig, rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """Keys for the adapters' input dropout, drawn from the layer's key without consuming it (the
    base model's dropout stays as it is without adapters)."""
    if rng is None or config.lora_rank == 0 or config.lora_dropout == 0.0:
        return [None] * n
    return list(jax.random.split(jax.random.fold_in(rng, 0x10A), n))


def apply(adapter_: LoRA | None, x: jax.Array, y: jax.Array, rng: jax.Array | None) -> jax.Array:
    """y (the base projection of x) plus the adapter's update, if there is an adapter."""
    return y if adapter_ is None else y + adapter_(x, rng)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """True for a parameter of a LoRA adapter (any element of its path ends with `_lora`)."""
    return any(str(getattr(p, "key", p)).endswith(SUFFIX) for p in path)


def merge(params: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Flat {dotted path: array} params with every adapter folded into its weight, and the
    adapters removed: the parameters of the same model without LoRA (`config.lora_rank=0`)."""
    scale = lora_scale(config) if config.lora_rank > 0 else 0.0
    merged = {k: v for k, v in params.items() if not is_adapter_path(k.split("."))}
    for key in params:
        if not key.endswith(SUFFIX + ".a"):
            continue
        weight = key[: -len(SUFFIX + ".a")]
        a, b = params[key], params[weight + SUFFIX + ".b"]
        w = merged[weight]
        # Stacked over layers, A is [layers, *in, r] and B [layers, r, *out].
        product = lambda a, b: scale * jnp.tensordot(
            a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        stacked = w.ndim == a.ndim + b.ndim - 3
        update = jax.vmap(product)(a, b) if stacked else product(a, b)
        merged[weight] = (w.astype(jnp.float32) + update).astype(w.dtype)
    return merged
