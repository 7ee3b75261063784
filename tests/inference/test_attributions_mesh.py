"""Attributions on a mesh: the batch split over the 8 simulated devices (padded where they do not
divide it) gives one device's integrated gradients and gradient × input."""

import jax
import numpy as np
import pytest
from flax import nnx

from transformer import sharding
from transformer.inference.attributions import Attributor
from transformer.models import get_preset
from transformer.models.heads import HeadConfig, TaskModel

BATCH, LENGTH, VOCAB = 6, 10, 96  # 6 rows on 8 devices: padded to 8, cut back to 6.


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, LENGTH + 1, BATCH)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, VOCAB, (BATCH, LENGTH)), 0).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def model():
    config = get_preset("bert-tiny", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                        mlp_dim=64, max_length=LENGTH, dropout_rate=0.0,
                        attention_dropout_rate=0.0)
    return TaskModel(config, HeadConfig("classification", 3, "cls", 0.0), rngs=nnx.Rngs(3))


def explain(attributor, ids, mask):
    keep = mask == 0  # Padding keeps its embedding (attribution 0).
    ig = attributor.integrated_gradients(
        ids, mask, target=[0, 1, None, 2, None, 1], steps=8, chunk_size=4,
        baseline_embeds=attributor.baseline_embeddings(ids, keep, fill_id=0))
    return ig, attributor.grad_x_input(ids, mask, target=2)


def test_sharded_attributions_equal_one_device(model, inputs):
    ids, mask = inputs
    single_ig, single_gx = explain(Attributor(model), ids, mask)
    mesh = sharding.make_mesh((4, 2, 1))  # The batch over data × fsdp: 8 ways.
    attributor = Attributor(model, mesh=mesh)
    assert attributor._rows(BATCH) == 8
    ig, gx = explain(attributor, ids, mask)
    for ours, reference in ((ig, single_ig), (gx, single_gx)):
        assert ours.embeddings.shape == reference.embeddings.shape == (BATCH, LENGTH, 32)
        np.testing.assert_array_equal(ours.labels, reference.labels)
        np.testing.assert_allclose(ours.embeddings, reference.embeddings, atol=1e-6,
                                   rtol=1e-5)
        np.testing.assert_allclose(ours.score, reference.score, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(ig.delta, single_ig.delta, atol=1e-6)
    assert np.abs(single_ig.embeddings).max() > 1e-3  # Not a vacuous comparison.
    assert jax.device_count() == 8
