"""The encoder-decoder on the shared layer stack: unrolled layers with remat give the loss of
scanned ones, and bfloat16 compute stays close to float32. (Gradients through the stack are the
shared `LayerStack`'s, tested with the other families.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer.models import build_model, get_preset
from transformer.models.heads import HeadConfig, TaskModel

CONFIG = get_preset("t5-v1_1-tiny", dropout_rate=0.0, num_decoder_layers=3)


def loss(config):
    rng = np.random.default_rng(0)
    source = jnp.asarray(rng.integers(2, 128, (2, 9)), jnp.int32)
    targets = jnp.asarray(rng.integers(2, 128, (2, 6)), jnp.int32)
    graphdef, state = nnx.split(build_model(config, seed=0))

    @jax.jit
    def run(state):
        logits = nnx.merge(graphdef, state)(source, targets).logits
        assert logits.dtype == jnp.float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return float(run(state))


def test_unrolled_remat_and_bfloat16_match_the_scanned_model():
    scanned = loss(CONFIG)
    assert abs(loss(CONFIG.replace(scan_layers=False, remat_policy="full")) - scanned) <= 1e-6
    assert abs(loss(CONFIG.replace(dtype="bfloat16")) - scanned) <= 2e-2 * scanned


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="position='relative' .* is built for"):
        get_preset("llama-tiny", position="relative")
    with pytest.raises(ValueError, match="encoder-decoders use position='relative'"):
        get_preset("t5-tiny", position="rope")
    with pytest.raises(ValueError, match="num_decoder_layers must be positive"):
        get_preset("t5-tiny", num_decoder_layers=0)
    with pytest.raises(ValueError, match="do not support LoRA"):
        get_preset("bart-tiny", lora_rank=4, lora_targets=("query",))
    with pytest.raises(ValueError, match="task heads sit on an encoder or a decoder"):
        TaskModel(get_preset("t5-tiny"), HeadConfig("classification"), rngs=nnx.Rngs(0))
