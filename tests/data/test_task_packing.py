"""Packed fine-tuning batches: the packing itself, and the model on packed rows computing exactly
what it computes on the same examples padded one per row (loss, gradients, predictions)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from transformer.data import task_packing
from transformer.data.tasks import IGNORE
from transformer.models import get_preset
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import objectives


def padded_batch(lengths, width=16, seed=0, types=True):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = (np.arange(width) < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(5, 90, mask.shape) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": ((rng.integers(0, 2, mask.shape) if types else 0) * mask).astype(np.int32),
        "weights": (lengths > 0).astype(np.float32),
    }


def test_every_token_is_placed_once_in_its_own_segment():
    lengths = [16, 3, 9, 1, 7, 0, 12, 4, 5, 2]  # One 0: an evaluation padding example.
    batch = padded_batch(lengths)
    packed = task_packing.pack_task_batch(batch, row_multiple=2)
    rows, length = packed["input_ids"].shape
    assert length == 16 and rows % 2 == 0 and rows < len(lengths)
    assert (packed["segment_ids"] > 0).sum() == sum(lengths)
    for i, n in enumerate(lengths):
        r, s = packed["example_rows"][i], packed["example_starts"][i]
        assert packed["example_lengths"][i] == n
        if n == 0:
            continue
        np.testing.assert_array_equal(packed["input_ids"][r, s:s + n], batch["input_ids"][i, :n])
        np.testing.assert_array_equal(packed["token_type_ids"][r, s:s + n],
                                      batch["token_type_ids"][i, :n])
        np.testing.assert_array_equal(packed["positions"][r, s:s + n], np.arange(n))
        segment = packed["segment_ids"][r, s]
        assert (packed["segment_ids"][r, s:s + n] == segment).all()
        assert (packed["segment_ids"][r] == segment).sum() == n  # No other example shares it.
    np.testing.assert_array_equal(packed["weights"], batch["weights"])


def test_row_count_is_bounded_and_fixed_when_asked():
    batch = padded_batch([2] * 32)
    assert task_packing.pack_task_batch(batch, row_multiple=4)["input_ids"].shape == (4, 16)
    assert task_packing.pack_task_batch(batch, num_rows=6)["input_ids"].shape == (6, 16)
    assert task_packing.default_row_multiple(32) == 4
    assert task_packing.default_row_multiple(32, devices=8) == 8
    with pytest.raises(ValueError, match="needs 4 rows"):
        task_packing.pack_task_batch(batch, num_rows=3)


def test_left_padded_input_is_refused():
    batch = padded_batch([3, 5])
    batch["attention_mask"] = batch["attention_mask"][:, ::-1].copy()
    with pytest.raises(ValueError, match="right-padded"):
        task_packing.pack_task_batch(batch)


def _labelled(kind, batch, seed=1):
    rng = np.random.default_rng(seed)
    n, t = batch["attention_mask"].shape
    lengths = batch["attention_mask"].sum(1)
    out = dict(batch)
    if kind == "token_classification":
        scored = (batch["attention_mask"] > 0) & (rng.random((n, t)) < 0.7)
        out["labels"] = np.where(scored, rng.integers(0, 3, (n, t)), IGNORE).astype(np.int32)
    else:
        out["labels"] = rng.integers(0, 3, n).astype(np.int32)
    if kind == "relation":
        first = np.minimum(1, np.maximum(lengths - 1, 0))
        out["entity_positions"] = np.stack([first, np.maximum(lengths - 2, 0)], 1).astype(np.int32)
    return out


CASES = [("encoder", "classification", "pooler"), ("encoder", "classification", "mean"),
         ("decoder", "classification", "last"), ("encoder", "token_classification", "pooler"),
         ("encoder", "relation", "pooler")]


@pytest.mark.parametrize("architecture, kind, pooling", CASES)
def test_packed_loss_gradients_and_predictions_equal_padded(architecture, kind, pooling):
    preset = get_preset("bert-tiny" if architecture == "encoder" else "gpt2-tiny")
    config = preset.replace(vocab_size=128, max_length=32)
    model = TaskModel(config, HeadConfig(kind, 3, pooling), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    lengths = [16, 3, 9, 1, 7, 0, 12, 4]
    batch = _labelled(kind, padded_batch(lengths, types=architecture == "encoder"))
    packed = task_packing.pack_task_batch(batch, row_multiple=2)
    assert packed["input_ids"].shape[0] < len(lengths)
    run = ml_collections.ConfigDict({"label_smoothing": 0.0})

    def loss(p, b):
        sums = objectives._task_loss(nnx.merge(graphdef, p), b, None, run)
        return sums["loss_sum"], sums

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l_pad, s_pad), g_pad = grad(params, jax.tree.map(jnp.asarray, batch))
    (l_pack, s_pack), g_pack = grad(params, jax.tree.map(jnp.asarray, packed))
    np.testing.assert_allclose(l_pack, l_pad, rtol=1e-5)
    assert float(s_pack["weight_sum"]) == float(s_pad["weight_sum"])
    for a, b in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)

    out_pad = objectives.forward(nnx.merge(graphdef, params), batch)["logits"]
    out_pack = objectives.forward(nnx.merge(graphdef, params), packed)["logits"]
    real = np.asarray(lengths) > 0
    if kind == "token_classification":
        out_pack = objectives.placement(packed).unpack_tokens(out_pack, 16)
        scored = batch["attention_mask"] > 0
        np.testing.assert_allclose(np.asarray(out_pack)[scored], np.asarray(out_pad)[scored],
                                   atol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(out_pack)[real], np.asarray(out_pad)[real],
                                   atol=1e-5)


def test_qa_batches_are_not_packed():
    config = get_preset("bert-tiny").replace(vocab_size=128, max_length=32)
    model = TaskModel(config, HeadConfig("qa"), rngs=nnx.Rngs(0))
    packed = task_packing.pack_task_batch(padded_batch([4, 5]))
    with pytest.raises(ValueError, match="not packed"):
        objectives.forward(model, packed)


def test_real_tokens_count_no_padding():
    batch = padded_batch([4, 0, 7])
    assert task_packing.real_tokens(batch) == 11
    assert task_packing.real_tokens(task_packing.pack_task_batch(batch)) == 11
    lm = {"inputs": np.zeros((2, 8)), "segment_ids": np.array([[1] * 8, [1] * 5 + [0] * 3])}
    assert task_packing.real_tokens(lm) == 13


def test_packed_batch_sharded_over_a_mesh_equals_one_device():
    """Rows and examples split over 8 devices (data × fsdp; an example's row may lie on another
    device than its label): the same loss and gradients as on one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from transformer import sharding

    config = get_preset("bert-tiny").replace(vocab_size=128, max_length=32)
    graphdef, params = nnx.split(TaskModel(config, HeadConfig("relation", 3), rngs=nnx.Rngs(0)))
    lengths = [16, 3, 9, 1, 7, 2, 12, 4, 5, 6, 2, 8, 3, 1, 10, 4]
    packed = task_packing.pack_task_batch(_labelled("relation", padded_batch(lengths)),
                                          row_multiple=8)
    run = ml_collections.ConfigDict({"label_smoothing": 0.0})

    def loss(p, b):
        return objectives._task_loss(nnx.merge(graphdef, p), b, None, run)["loss_sum"]

    reference = jax.jit(jax.value_and_grad(loss))(params, jax.tree.map(jnp.asarray, packed))
    mesh = sharding.make_mesh((2, 4, 1))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        batch = {k: jax.device_put(v, rows) for k, v in packed.items()}
        sharded = jax.jit(jax.value_and_grad(loss))(params, batch)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
