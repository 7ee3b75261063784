"""Task heads: output shapes, loss masking (ignored labels, weight-0 padding rows), parameter
names, decoders, and layer-wise learning-rate decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer.data.tasks import IGNORE
from transformer.models import get_preset
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import layer_decay, objectives, optimizer
from transformer.train.config import base_config

B, T, V = 4, 12, 64
CONFIG = base_config("bert-tiny")
TINY = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=T,
            dropout_rate=0.0, attention_dropout_rate=0.0)


_MODELS = {}


def model_for(kind, num_labels=3, preset="bert-tiny", pooling="pooler"):
    key = (kind, num_labels, preset, pooling)
    if key not in _MODELS:  # Built once; forward and loss are jitted (eager runs are slow).
        _MODELS[key] = TaskModel(get_preset(preset, **TINY), HeadConfig(kind, num_labels, pooling),
                                 rngs=nnx.Rngs(0))
    return _MODELS[key]


@nnx.jit
def forward(model, batch):
    return objectives.forward(model, batch)


@nnx.jit
def loss_sums(model, batch):
    return objectives._task_loss(model, batch, None, CONFIG)


def batch_for(kind, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([T, 9, 5, 7])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    batch = {"input_ids": rng.integers(1, V, (B, T)).astype(np.int32) * mask,
             "attention_mask": mask, "token_type_ids": np.zeros((B, T), np.int32),
             "weights": np.array([1, 1, 1, 0], np.float32)}  # The last row is padding.
    if kind in ("classification", "relation"):
        batch["labels"] = rng.integers(0, 3, B).astype(np.int32)
    if kind == "relation":
        batch["entity_positions"] = np.array([[1, 3], [2, 4], [0, 1], [1, 2]], np.int32)
    if kind == "token_classification":
        labels = rng.integers(0, 3, (B, T)).astype(np.int32)
        labels[:, 0] = IGNORE  # [CLS]
        labels[:, 2] = IGNORE  # a later subword
        batch["labels"] = np.where(mask == 1, labels, IGNORE).astype(np.int32)
    if kind == "qa":
        batch["start_positions"] = np.array([1, 2, 0, 3], np.int32)
        batch["end_positions"] = np.array([2, 4, 0, 3], np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("kind, key, shape", [
    ("classification", "logits", (B, 3)), ("token_classification", "logits", (B, T, 3)),
    ("relation", "logits", (B, 3)), ("qa", "start_logits", (B, T))])
def test_head_output_shapes_and_parameter_tree(kind, key, shape):
    model = model_for(kind)
    out = forward(model, batch_for(kind))
    assert out[key].shape == shape and out[key].dtype == jnp.float32
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params) == {"backbone", "head"}
    d = 64 if kind == "relation" else 32  # Relations read two concatenated states.
    assert params["head"]["kernel"].shape == (d, 2 if kind == "qa" else 3)
    # Logical axes on the head, like the backbone's: the same sharding rules apply.
    assert model.head.kernel.get_metadata()["out_sharding"] == ("embed", None)


@pytest.mark.parametrize("kind", ["classification", "token_classification", "relation", "qa"])
def test_padding_rows_and_ignored_labels_do_not_count(kind):
    model = model_for(kind)
    batch = batch_for(kind)
    sums = loss_sums(model, batch)
    changed = dict(batch)
    # Anything in the padding row (weight 0), and the labels of ignored positions, are irrelevant.
    changed["input_ids"] = batch["input_ids"].at[3].set(7)
    for key in ("labels", "start_positions", "end_positions"):
        if key in batch and batch[key].ndim == 1:
            changed[key] = batch[key].at[3].set(1)
    again = loss_sums(model, changed)
    np.testing.assert_allclose(again["loss_sum"], sums["loss_sum"], rtol=1e-6)
    if kind == "token_classification":
        expected = float(((np.asarray(batch["labels"]) != IGNORE) * np.array(
            [1, 1, 1, 0])[:, None]).sum())
        assert float(sums["weight_sum"]) == expected
    else:
        assert float(sums["weight_sum"]) == 3.0


def test_token_loss_equals_a_mean_over_labelled_tokens():
    model = model_for("token_classification")
    batch = batch_for("token_classification")
    logits = np.asarray(forward(model, batch)["logits"], np.float64)
    labels, weights = np.asarray(batch["labels"]), np.asarray(batch["weights"])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = (labels != IGNORE) & (weights[:, None] > 0)
    nll = -np.take_along_axis(log_p, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    sums = loss_sums(model, batch)
    np.testing.assert_allclose(float(sums["loss_sum"]), nll[keep].sum(), rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_decoder_classification_with_other_poolings(pooling):
    model = model_for("classification", preset="gpt2-tiny", pooling=pooling)
    batch = batch_for("classification")
    out = forward(model, batch)["logits"]
    assert out.shape == (B, 3)
    if pooling == "last":  # The padding after the last real token does not change the result.
        more = dict(batch, input_ids=jnp.where(batch["attention_mask"] == 1, batch["input_ids"], 5))
        np.testing.assert_allclose(forward(model, more)["logits"], out, atol=1e-6)


def test_pooler_pooling_needs_a_pooler():
    with pytest.raises(ValueError, match="needs a backbone with a pooler"):
        forward(model_for("classification", preset="gpt2-tiny"), batch_for("classification"))


def test_layer_decay_scales():
    scale = lambda *names, shape=(3, 2): layer_decay.layer_scales(names, shape, 0.5, 3)
    np.testing.assert_allclose(np.ravel(scale("backbone", "layers", "blocks", "mlp", "wi")),
                               [0.125, 0.25, 0.5])
    assert scale("backbone", "embeddings", "tokens") == 0.5 ** 4
    assert scale("head", "kernel") == 1.0 and scale("backbone", "pooler") == 1.0
    tx = layer_decay.with_layer_decay(optax.sgd(1.0), 0.5, 3)
    params = {"head": {"kernel": jnp.ones((2,))}, "backbone": {"layers": {"w": jnp.ones((3, 2))}}}
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["backbone"]["layers"]["w"][:, 0], [-0.125, -0.25, -0.5])
    np.testing.assert_allclose(updates["head"]["kernel"], [-1.0, -1.0])
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_weight_decay_mask_of_a_task_model():
    config = base_config("bert-tiny")
    params = {"backbone": {"embeddings": {"tokens": 0}, "layers": {"blocks": {"mlp": {"wi": 0}}},
                           "pooler": 0, "pooler_bias": 0}, "head": {"kernel": 0, "bias": 0}}
    mask = optimizer.decay_mask(params, config)
    assert mask["backbone"]["embeddings"]["tokens"] is False
    assert mask["backbone"]["layers"]["blocks"]["mlp"]["wi"] is True
    assert mask["head"] == {"kernel": True, "bias": False}
    assert mask["backbone"]["pooler"] is True and mask["backbone"]["pooler_bias"] is False
