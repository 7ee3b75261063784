"""The fused attention kernels (transformer/models/kernels/) against the einsum reference.

The TPU splash kernel runs in Pallas interpret mode on the CPU: outputs and gradients for causal,
windowed, padded and packed inputs, GQA ratios 1, 2, 8, float32 and bfloat16, and the whole model
under a mesh. The cuDNN kernel cannot run here: its mask arguments (lengths, causal flag, window)
go to `jax.nn.dot_product_attention`'s XLA implementation instead, which takes the same ones.
On a TPU (JAX_PLATFORMS=tpu) the splash kernel itself runs, on an NVIDIA GPU (JAX_PLATFORMS=cuda)
the cuDNN one (in bfloat16, which its flash path needs), against the same reference.
Padding queries are compared nowhere: the kernels leave them unspecified (never used).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import sharding
from transformer.models import build_model, dot_product_attention, get_preset, make_attention_mask
from transformer.models.kernels import cudnn, splash

T, D = 256, 64  # Two tiles of 128 (the kernel's minimum) a sequence.
BACKEND = jax.default_backend()
# The TPU kernel: itself on a TPU, run by the Pallas interpreter elsewhere.
KERNEL = "splash" if BACKEND == "tpu" else "splash_interpret"

# Row 0 of each batch: three packed segments and padding; row 1: one sequence, no padding.
PACKED = np.array([[1] * 90 + [2] * 70 + [3] * 60 + [0] * 36, [1] * T], np.int32)
# One sequence a row, padded on the right (what cuDNN's lengths can say).
PADDED = np.array([[1] * 200 + [0] * 56, [1] * T], np.int32)

# name: (segment ids, causal, window, query heads, key/value heads, dtype)
SPLASH_CASES = {
    "causal-packed-gqa2": (PACKED, True, None, 4, 2, jnp.float32),
    "window-packed-gqa8": (PACKED, True, 48, 8, 1, jnp.float32),
    "bidirectional-padded-gqa1": (PADDED, False, None, 2, 2, jnp.float32),
    "causal-packed-gqa2-bf16": (PACKED, True, None, 4, 2, jnp.bfloat16),
}
# Of the largest magnitude compared (measured on the CPU: 1.1e-6 and 3.8e-3). TPU and GPU
# matrix units multiply float32 in bfloat16 passes at the default precision.
TOLERANCE = {jnp.float32: 1e-5 if BACKEND == "cpu" else 1e-2, jnp.bfloat16: 1e-2}


def random_inputs(heads, kv_heads, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = lambda h: (2, T, h, D)
    q, k, v = (jax.random.normal(key, shape(h), dtype)
               for key, h in zip(keys, (heads, kv_heads, kv_heads)))
    cotangent = jax.random.normal(keys[3], shape(heads), jnp.float32)
    return q, k, v, cotangent


def reference_attention(segments, causal, window):
    mask = make_attention_mask(segments, segments, causal=causal, window=window)
    return lambda q, k, v: dot_product_attention(q, k, v, mask, impl="einsum")[0]


def output_and_grads(attend, q, k, v, cotangent, segments):
    """The output and d(sum(output · cotangent over real queries))/d(q, k, v), in float32."""
    real = jnp.asarray(segments > 0)[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(jnp.where(real, attend(q, k, v).astype(jnp.float32), 0)
                                   * cotangent)
    out = attend(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return [jnp.where(real, out, 0).astype(jnp.float32)] + [g.astype(jnp.float32) for g in grads]


def max_relative_error(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def splash_against_reference(segments, causal, window, heads, kv_heads, dtype):
    """Relative errors of (output, dq, dk, dv) of the kernel against the reference, both jitted
    on the same inputs (bfloat16 inputs: the reference computes on them in float32)."""
    q, k, v, cotangent = random_inputs(heads, kv_heads, dtype)
    kernel = lambda q, k, v: splash.attention(
        q, k, v, jnp.asarray(segments), causal=causal, window=window, scale=1 / np.sqrt(D),
        interpret=KERNEL == "splash_interpret")
    reference = reference_attention(segments, causal, window)
    widened = [x.astype(jnp.float32) for x in (q, k, v)]
    got = jax.jit(lambda *a: output_and_grads(kernel, *a, segments))(q, k, v, cotangent)
    want = jax.jit(lambda *a: output_and_grads(reference, *a, segments))(*widened, cotangent)
    return [max_relative_error(g, w) for g, w in zip(got, want)]


@pytest.fixture(scope="module")
def splash_errors():
    return {name: splash_against_reference(*case) for name, case in SPLASH_CASES.items()}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_outputs_and_gradients_equal_the_reference(splash_errors, case):
    tolerance = TOLERANCE[SPLASH_CASES[case][-1]]
    for what, error in zip(("output", "dq", "dk", "dv"), splash_errors[case]):
        assert error < tolerance, (case, what, error)


def tiny_decoder_config(**overrides):
    """Llama-like, one layer of head dim 64, GQA 4/2, a sliding window, float32."""
    return dataclasses.replace(
        get_preset("llama-tiny"), num_layers=1, hidden_size=128, num_heads=4, num_kv_heads=2,
        head_dim=64, mlp_dim=64, vocab_size=64, max_length=T, sliding_window=64, **overrides)


@pytest.fixture(scope="module")
def decoder():
    """decoder(impl): one set of parameters (initialized once) in a model with that attention."""
    parameters = nnx.state(build_model(tiny_decoder_config(attention_impl="einsum")))

    def with_attention(impl):
        abstract = nnx.eval_shape(lambda: build_model(tiny_decoder_config(attention_impl=impl)))
        return nnx.merge(nnx.graphdef(abstract), parameters)

    return with_attention


def test_decoder_with_splash_under_a_mesh_equals_einsum_on_one_device(decoder):
    """The model switch end to end: batch over fsdp, heads over tensor (the kernel runs in
    shard_map), the logits against the einsum model's on one device."""
    ids = jax.random.randint(jax.random.key(1), (2, T), 1, 64)
    positions = np.concatenate([np.arange(90), np.arange(70), np.arange(60), np.zeros(36)])
    positions = np.stack([positions, np.arange(T)]).astype(np.int32)
    logits = lambda model: model(ids, segment_ids=PACKED, positions=positions).logits
    split = 2 if len(jax.devices()) >= 4 else 1  # 8 simulated CPU devices; a GPU host: maybe 1.
    mesh = sharding.make_mesh({"data": 1, "fsdp": split, "tensor": split},
                              devices=jax.devices()[:split * split])
    kernel = decoder(KERNEL)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        got = jax.jit(logits)(kernel)
    want = jax.jit(logits)(decoder("einsum"))
    real = (PACKED > 0)[..., None]
    error = max_relative_error(jnp.where(real, got, 0), jnp.where(real, want, 0))
    assert error < TOLERANCE[jnp.float32]


CUDNN_CASES = {  # name: (causal, window, query heads, key/value heads)
    "causal-gqa2": (True, None, 4, 2),
    "window-gqa8": (True, 48, 8, 1),
    "bidirectional-gqa1": (False, None, 2, 2),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_mask_arguments_give_the_reference_mask(case):
    """The lengths / causal flag / window handed to cuDNN, given to XLA's implementation of the
    same function, attend as the einsum reference does over segment ids."""
    causal, window, heads, kv_heads = CUDNN_CASES[case]
    dtype = jnp.bfloat16 if BACKEND == "gpu" else jnp.float32
    q, k, v, _ = random_inputs(heads, kv_heads, dtype, seed=1)

    @jax.jit
    def with_cudnn_arguments(q, k, v, segments):
        if BACKEND == "gpu":  # The kernel itself.
            return cudnn.attention(q, k, v, segments, causal=causal, window=window,
                                   scale=1 / np.sqrt(D))
        arguments = cudnn.mask_arguments(segments, causal=causal, window=window)
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **arguments)

    got = with_cudnn_arguments(q, k, v, jnp.asarray(PADDED)).astype(jnp.float32)
    widened = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(reference_attention(PADDED, causal, window))(*widened)
    real = (PADDED > 0)[:, :, None, None]
    error = max_relative_error(jnp.where(real, got, 0), jnp.where(real, want, 0))
    assert error < (TOLERANCE[dtype] if BACKEND == "gpu" else 1e-6)


def test_cudnn_refuses_packed_rows_at_run_time():
    assert np.asarray(cudnn.one_sequence_a_row(jnp.asarray(PADDED))).all()
    left_padded = np.array([[0] * 10 + [1] * (T - 10)], np.int32)
    flags = cudnn.one_sequence_a_row(jnp.asarray(np.concatenate([PACKED, left_padded])))
    assert np.asarray(flags).tolist() == [False, True, False]
    check = jax.jit(lambda s: (cudnn.check_one_sequence_a_row(s), s.sum())[1])
    check(jnp.asarray(PADDED)).block_until_ready()
    with pytest.raises(Exception, match=r"rows \[0\] hold packed segments.*attention_impl='xla'"):
        check(jnp.asarray(PACKED)).block_until_ready()


def test_kernels_name_the_fallback_when_they_cannot_run(decoder):
    ids = jnp.ones((1, T), jnp.int32)
    trace = lambda model, ids, **kwargs: jax.eval_shape(lambda: model(ids, **kwargs).logits)
    for impl, platform, device in (("splash", "tpu", "needs a TPU"),
                                   ("cudnn", "gpu", "needs an NVIDIA GPU")):
        if platform == BACKEND:  # Runs here: nothing to refuse.
            continue
        with pytest.raises(ValueError, match=f"{device}.*attention_impl='xla'"):
            trace(decoder(impl), ids)
    interpret = decoder(KERNEL)
    with pytest.raises(ValueError, match="output_attentions.*attention_impl='xla'"):
        trace(interpret, ids, output_attentions=True)
    with pytest.raises(ValueError, match="multiple of 128.*attention_impl='xla'"):
        trace(interpret, jnp.ones((1, 200), jnp.int32))
    q = jnp.ones((1, T, 2, D))
    with pytest.raises(ValueError, match="without segment ids.*attention_impl='xla'"):
        dot_product_attention(q, q, q, jnp.ones((1, 1, T, T), bool), impl="splash")
    context = sharding.make_mesh({"data": 1, "fsdp": 1, "context": 2, "tensor": 1},
                                 devices=jax.devices()[:2])
    with (sharding.use_mesh(context, sharding.DEFAULT_RULES),
          pytest.raises(ValueError, match="context parallelism.*attention_impl='xla'")):
        trace(interpret, ids)
