"""Distillation's transfer set: examples the student learns from the teacher alone. Their labels
never reach the loss, the soft term covers them, the data stream joins both batches and resumes
from its checkpointed state, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_distill import B, make_batches, save_teacher, setup, student_config
from transformer import sharding
from transformer.train import trainer
from transformer.train.objectives import distill


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_label_weights_keep_the_transfer_labels_out_of_the_loss():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 3)) * 2, rng.normal(size=(8, 3)) * 2
    y = rng.integers(0, 3, 8)
    weights = np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)  # Row 3: padding.
    labelled = weights * (np.arange(8) < 4)  # Rows 4..7: the transfer set.
    temp, alpha = 2.0, 0.6
    sums = distill.distillation_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                     jnp.asarray(weights), temperature=temp, alpha=alpha,
                                     label_weights=jnp.asarray(labelled))
    ce = -(log_softmax(s)[np.arange(8), y] * labelled).sum()
    lp_t, lp_s = log_softmax(t / temp), log_softmax(s / temp)
    kl = ((np.exp(lp_t) * (lp_t - lp_s)).sum(-1) * weights).sum()
    np.testing.assert_allclose(float(sums["hard_sum"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["soft_sum"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss_sum"]), (1 - alpha) * ce + alpha * temp**2 * kl,
                               rtol=1e-5)
    assert float(sums["label_sum"]) == 3 and float(sums["weight_sum"]) == 7
    # Any labels on the transfer rows: the same loss and gradient.
    other = np.where(labelled > 0, y, (y + 1) % 3)

    def loss(s, y):
        return distill.distillation_sums(s, jnp.asarray(t), y, jnp.asarray(weights),
                                         temperature=temp, alpha=alpha,
                                         label_weights=jnp.asarray(labelled))["loss_sum"]

    g1 = jax.grad(loss)(jnp.asarray(s), jnp.asarray(y))
    g2 = jax.grad(loss)(jnp.asarray(s), jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"))


def with_transfer(labelled, transfer):
    out = {k: np.concatenate([labelled[k], transfer[k]]) for k in labelled}
    out["label_weights"] = np.repeat(np.array([1, 0], np.float32), B)
    return out


def test_the_step_never_reads_transfer_labels(teacher_dir):
    """Two steps on labelled + transfer batches: scrambling the transfer labels changes nothing;
    the labelled ones do."""
    config = student_config(teacher_dir)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state0, step, batch_sharding, rules, _ = setup(config, mesh)
    labelled, transfer = make_batches(2, seed=0), make_batches(2, seed=1)

    def run(flip_transfer=False, flip_labelled=False):
        state, metrics = jax.tree.map(jnp.copy, state0), []  # The step donates its state.
        with sharding.use_mesh(mesh, rules):
            for a, b in zip(labelled, transfer):
                batch = with_transfer(a, b)
                flip = np.r_[np.full(B, flip_labelled), np.full(B, flip_transfer)]
                batch["labels"] = np.where(flip, 1 - batch["labels"], batch["labels"])
                state, m = step(state, trainer.to_global(batch, batch_sharding))
                metrics.append({k: float(v) for k, v in m.items()})
        return metrics

    ref, scrambled, relabelled = run(), run(flip_transfer=True), run(flip_labelled=True)
    assert ref == scrambled
    assert ref[1]["loss"] != relabelled[1]["loss"]
    assert ref[0]["weights"] == 28  # Real examples of both halves (2 padding rows in each 16).


@pytest.fixture(scope="module")
def sst2(fixtures, tmp_path_factory):
    """Labelled (40 examples) and transfer (19) files cut from the SST-2 sample."""
    root = tmp_path_factory.mktemp("sst2")
    for name, n in (("train.tsv", 41), ("dev.tsv", 20)):
        lines = (fixtures / "sst2" / name).read_text().splitlines(keepends=True)
        (root / name).write_text("".join(lines[:n]))
    return root


def transfer_config(sst2, tmp_path, **distill_fields):
    from tests.finetune.conftest import load_recipe

    config = load_recipe("distill", "ci")
    config.data.local_files.train = str(sst2 / "train.tsv")
    config.data.local_files.validation = str(sst2 / "dev.tsv")
    config.data.cache_dir = str(tmp_path / "cache")
    config.distill.update({"transfer_file": str(sst2 / "dev.tsv"), "transfer_batch_size": 8,
                           **distill_fields})
    return config


def test_the_stream_joins_both_and_resumes(sst2, tmp_path):
    from transformer.data.tokenizer import load_tokenizer
    from transformer.train.config import minilm_dir

    config = transfer_config(sst2, tmp_path)
    tokenizer = load_tokenizer(minilm_dir())
    stream = distill._data(config, tokenizer, 0, 1)
    batch = config.data.global_batch_size
    first = next(stream)
    assert first["input_ids"].shape[0] == first["label_weights"].shape[0] == batch + 8
    np.testing.assert_array_equal(first["label_weights"], [1] * batch + [0] * 8)
    state = stream.get_state()
    expected = [next(stream) for _ in range(2)]
    again = distill._data(config, tokenizer, 0, 1)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bad_transfer_settings_are_refused(sst2, tmp_path):
    cases = [
        (dict(transfer_batch_size=0), "needs both"),
        (dict(alpha=0.0, beta=0.0), "learnt from the teacher alone"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            distill._data(transfer_config(sst2, tmp_path, **fields), None, 0, 1)
    config = transfer_config(sst2, tmp_path)
    config.grad_accum_steps = 8
    with pytest.raises(ValueError, match="must be a multiple of grad_accum_steps"):
        distill._data(config, None, 0, 1)
