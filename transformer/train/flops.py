"""Model FLOPs per token and peak device FLOP/s, for model FLOPs utilization (MFU).

FLOPs per trained token = 3 × the forward FLOPs per token of the model that the step runs
(Kaplan et al. 2020; PaLM appendix B): a matmul does 2 FLOPs (multiply + add) per weight per
token forward, and its backward pass twice that (the gradients of its input and of its weight).
The forward pass per token is:
- the layer stack, per layer: the Q/K/V/output projections 2·d·(h + 2·h_kv)·d_h + 2·h·d_h·d,
  the feed-forward 2·d·f·(2, or 3 when gated), and attention 4·T·h·d_h (the scores QKᵀ and the
  weighted sum AV, each 2·T·h·d_h, T = sequence length). The causal mask is not subtracted (the
  usual convention, which keeps MFU comparable), nor a sliding window: both are computed in full.
- the output the objective computes on top (`head_flops`), counted where the model runs it:
  - LM (`lm_head_flops`): the output layer over the vocabulary, 2·d·V, at every position (a
    masked LM too: the encoder scores all positions and the loss weights the masked ones), plus
    a BERT-style MLM transform 2·d²;
  - task heads (`task_head_flops`): token classification and QA score every token (2·d·labels,
    2·d·2); sequence classification scores one pooled vector per sequence (2·d·labels, plus the
    BERT pooler 2·d² with pooling='pooler'), relation extraction one pair of entity states
    (2·2d·labels), so those per-sequence FLOPs are spread over the T tokens of the sequence.
    A task model computes no LM head: its backbone's output layer is never run.
Embedding lookups, biases, norms, activations, softmax, the loss and the optimizer update are
elementwise work that the count leaves out (a few percent on tiny models, less on big ones), and
rematerialization is not counted: MFU measures useful work only. tests/train/test_flops.py
checks every objective against XLA's cost analysis of the compiled train step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from transformer.models import ModelConfig
from transformer.models.heads import HeadConfig

TRAIN_FACTOR = 3  # Forward + backward: the backward pass costs twice the forward.

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


def layer_flops(config: ModelConfig, seq_len: int, moe: bool = False) -> float:
    """Forward FLOPs per token of one Transformer block: projections, feed-forward, attention.
    An MoE block counts what a token runs: the router, its top-k experts, the shared expert."""
    d, h, kv, dh = config.hidden_size, config.num_heads, config.kv_heads, config.dim_per_head
    projections = 2 * d * (h + 2 * kv) * dh + 2 * h * dh * d
    width = config.mlp_dim
    if moe:
        width = config.num_experts_per_token * config.expert_dim + config.moe_shared_expert_dim
    feed_forward = 2 * d * width * (3 if config.gated_mlp else 2)
    if moe:
        feed_forward += 2 * d * (config.num_experts + bool(config.moe_shared_expert_dim))
    attention = 2 * 2 * seq_len * h * dh
    return projections + feed_forward + attention


def backbone_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the layer stack (an encoder or a decoder)."""
    if config.architecture == "encoder_decoder":  # Both stacks as if their rows were seq_len
        # long; each decoder block adds cross-attention (projections and scores).
        d, h, kv, dh = config.hidden_size, config.num_heads, config.kv_heads, config.dim_per_head
        cross = 2 * d * (h + 2 * kv) * dh + 2 * h * dh * d + 2 * 2 * seq_len * h * dh
        block = layer_flops(config, seq_len)
        return config.num_layers * block + config.decoder_layers * (block + cross)
    if config.architecture not in ("encoder", "decoder"):
        raise NotImplementedError(f"no FLOP count for architecture {config.architecture!r}; "
                                  "add its layer stack to transformer/train/flops.py")
    moe_layers = config.num_layers // config.moe_every if config.num_experts else 0
    return ((config.num_layers - moe_layers) * layer_flops(config, seq_len)
            + moe_layers * layer_flops(config, seq_len, moe=True))


def lm_head_flops(config: ModelConfig) -> float:
    """Forward FLOPs per token of the LM output: the MLM transform (encoders), the vocabulary."""
    d = config.hidden_size
    transform = 2 * d * d if config.architecture == "encoder" and config.mlm_head else 0
    return transform + 2 * d * config.vocab_size


def task_head_flops(config: ModelConfig, head: HeadConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a task head (`transformer.models.heads.Head`): per-token heads
    score every position; sequence and relation heads score one vector per sequence."""
    d = config.hidden_size
    if head.kind == "qa":
        return 2 * d * 2
    if head.kind == "token_classification":
        return 2 * d * head.num_labels
    if head.kind == "relation":
        return 2 * (2 * d) * head.num_labels / seq_len
    pooler = 2 * d * d if head.pooling == "pooler" else 0
    return (pooler + 2 * d * head.num_labels) / seq_len


def flops_per_token(config: ModelConfig, seq_len: int, head_flops: float | None = None) -> float:
    """Training FLOPs per token (see the module docstring): 3 × (layer stack + head) forward.
    `head_flops` is the objective's output per token (`Objective.head_flops`); None = the plain
    model's own LM head."""
    if head_flops is None:
        head_flops = lm_head_flops(config)
    return TRAIN_FACTOR * (backbone_flops(config, seq_len) + head_flops)


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
    """The float32 `jnp.dot` rate of this host: the practical peak of a CPU. The fastest of the
    repeats counts: a peak measured during a burst of other load would overstate MFU."""
    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest
