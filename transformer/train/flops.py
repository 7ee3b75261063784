"""Model FLOPs per token and peak device FLOP/s, for model FLOPs utilization (MFU).

FLOPs per trained token = 6·N + 12·L·d_attn·T (Kaplan et al. 2020; PaLM appendix B):
- 6·N: the forward pass does 2 FLOPs per weight per token (multiply + add) and the backward pass
  twice that; N counts every weight used in a matmul — all parameters except the embedding-lookup
  tables, plus the output layer, which a tied model reuses from the token table.
- 12·L·d_attn·T: attention scores QKᵀ and the weighted sum AV, each 2·T·d_attn FLOPs per token per
  layer forward (d_attn = heads × head_dim, T = sequence length), ×3 for forward and backward.
  The causal mask is not subtracted (the usual convention, which keeps MFU comparable).
Rematerialization is not counted: MFU measures useful work only.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.models import ModelConfig
from transformer.train.state import abstract_model

# Dense bfloat16 peak FLOP/s per device, by `device_kind` prefix (vendor datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def matmul_params(config: ModelConfig) -> int:
    """N of the formula: parameters used in matmuls (see the module docstring)."""
    model = abstract_model(config)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tables = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model.embeddings, nnx.Param)))
    output = config.vocab_size * config.hidden_size if config.tie_embeddings else 0
    return total - tables + output


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 12 * config.num_layers * config.num_heads * config.dim_per_head * seq_len
    return 6.0 * matmul_params(config) + attention


def peak_flops(device: jax.Device, override: float | None = None) -> float:
    """Peak FLOP/s of one device: the config's value, the datasheet table, or (CPU) measured."""
    if override:
        return float(override)
    for kind, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device.device_kind.startswith(kind):
            return flops
    if device.platform == "cpu":
        return measured_matmul_flops()
    raise ValueError(
        f"unknown peak FLOP/s for device kind {device.device_kind!r}; set config.peak_flops"
    )


def measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The float32 `jnp.dot` rate of this host: the practical peak of a CPU."""
    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        dot(a, a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)
