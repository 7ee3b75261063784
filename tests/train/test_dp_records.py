"""DP-SGD whose unit is a record, not a row: causal-LM fine-tuning and SFT (one document or
conversation a row, its loss the mean over its tokens) and extractive QA (a question's windows
clipped as one block)."""

import math

import dp_accounting
import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.test_lora_training import lora_config
from tests.train.test_steps import T, V, one_device_mesh, setup
from transformer.data import dp_records, poisson
from transformer.models import ModelConfig
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import dp, objectives, trainable, trainer
from transformer.train import state as train_state
from transformer.train import step as step_lib
from transformer.train.config import finetune_config

B = 8  # Records a batch.


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def document_batch(lengths, seed=0):
    """Rows as `dp_records` makes them: one document each, truncated/padded to T tokens."""
    rng = np.random.default_rng(seed)
    rows = [dp_records.DocumentRow(T)({"tokens": rng.integers(1, V, n).astype(np.int32)})[0]
            for n in lengths]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def pad(batch, rows):
    """`rows` all-zero rows appended, as the Poisson loader pads its batches."""
    return {k: np.concatenate([v, np.zeros((rows, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


@pytest.fixture(scope="module")
def lm():
    """A tiny LoRA Llama (only the adapters train), its loss and the trainable split."""
    config = lora_config(objective="lm")
    config.model.num_layers = 1
    config.dp.update(enabled=True, expected_batch_size=B, microbatch_size=4, clip_norm=math.inf,
                     noise_multiplier=0.0)
    config.data.global_batch_size = B
    state, *_ = setup(config, one_device_mesh())
    train, frozen = trainable.split(jax.device_get(state.params), trainable.predicate(config))
    model_config = ModelConfig.from_dict(config.model.to_dict())
    build = objectives.get_objective("lm").builder(model_config, config)
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    loss_fn = step_lib.make_loss_fn(graphdef, config)
    loss = lambda p, f, b, r: loss_fn(trainable.join(p, f), b, r)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    return dict(config=config, train=train, frozen=frozen, grad_fn=grad_fn,
                loss=lambda p, b: loss(p, frozen, b, None))


def test_lm_per_example_gradients_are_token_means_of_one_record_batches(lm):
    lengths = [T, 5, 11, 30, 7, 2, 16, 9]  # 30 > T: truncated; 2: one target token.
    batch = document_batch(lengths)
    assert batch["weights"].sum(axis=1).tolist() == [min(n, T) - 1 for n in lengths]
    padded = pad(batch, 4)
    run = jax.jit(lambda p, b: dp.clipped_gradient_sum(
        lm["grad_fn"], p, lm["frozen"], jax.tree.map(lambda x: x.reshape(-1, 4, *x.shape[1:]), b),
        None, math.inf, token_mean=True))
    total, sums, norms = run(lm["train"], padded)
    one = jax.jit(lambda p, b: lm["grad_fn"](p, lm["frozen"], b, None))
    reference = []
    for i in range(B):  # The mean token loss of record i alone, differentiated.
        (loss_sum, s), g = one(lm["train"], {k: v[i:i + 1] for k, v in batch.items()})
        reference.append(flat(g) / float(s["weight_sum"]))
    np.testing.assert_allclose(np.asarray(norms).reshape(-1)[:B],
                               [np.linalg.norm(g) for g in reference], rtol=1e-5)
    assert np.all(np.asarray(norms).reshape(-1)[B:] == 0)  # Padding rows: nothing.
    np.testing.assert_allclose(flat(total), sum(reference), rtol=1e-5, atol=1e-7)
    assert float(sums["weight_sum"]) == batch["weights"].sum()


def test_lm_without_noise_or_clipping_equals_non_private_training(lm):
    """The private gradient of the step (σ = 0, C = ∞, padding rows) against the non-private
    mean gradient: records of equal length, so the mean of their token means is the token mean."""
    batch = document_batch([T + 4] * B, seed=1)
    padded = pad(batch, 4)
    private = jax.jit(lambda p, b: dp.make_private_gradient(lm["grad_fn"], lm["config"])(
        p, lm["frozen"], jax.tree.map(lambda x: x.reshape(-1, 4, *x.shape[1:]), b),
        jax.random.key(0), False))
    grads, sums, metrics = private(lm["train"], padded)

    def mean_loss(p, b):
        loss_sum, s = lm["loss"](p, b)
        return loss_sum / s["weight_sum"]

    plain = jax.jit(jax.grad(mean_loss))(lm["train"], batch)
    np.testing.assert_allclose(flat(grads), flat(plain), rtol=1e-5, atol=1e-8)
    assert float(metrics["dp_batch_examples"]) == B
    assert float(sums["weight_sum"]) == B * (T - 1)


def test_sft_end_to_end_reports_the_accountants_epsilon(tmp_path):
    """configs/sft.py:ci,dp through the trainer: a conversation a row, Poisson batches, LoRA, ε."""
    from tests.finetune.conftest import load_recipe

    config = load_recipe("sft", "ci,dp")
    config.data.update(max_length=96, prefetch_buffer_size=0)
    config.model.update(num_layers=1, max_length=96, hidden_size=32, num_heads=2, num_kv_heads=1,
                        mlp_dim=64)
    config.num_train_steps, config.eval_every = 2, 0
    result = trainer.train_and_evaluate(config, tmp_path / "run")
    resolved, metrics = result["config"].dp, result["metrics"]
    # n: the conversations the loader samples from (of the sample's 40 questions, those whose
    # answer is at its offset and fits the 96 tokens), one row each.
    rows = dp_records.conversations(result["config"].data, "train", trainer.get_tokenizer(config))
    n = len(rows)
    assert 30 < n <= 40 and all(r[0]["segment_ids"].max() == 1 for r in rows)
    assert (resolved.dataset_size, resolved.delta, resolved.expected_batch_size) == (n, 1 / n, 4)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        4 / n, dp_accounting.GaussianDpEvent(resolved.noise_multiplier)), 2))
    assert metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1 / n), rel=1e-9)
    assert metrics["dp_epsilon"] <= 8.0 and resolved.noise_multiplier > 0
    assert 0 <= metrics["dp_batch_examples"] <= result["config"].data.global_batch_size


@pytest.fixture(scope="module")
def qa():
    """A tiny random BERT with a QA head, and its loss on blocks of windows."""
    config = finetune_config("qa", "squad")
    config.model.update(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                        max_length=T, dropout_rate=0.0, attention_dropout_rate=0.0)
    config.finetune.classifier_dropout = 0.0
    model_config = ModelConfig.from_dict(config.model.to_dict())
    build = lambda rngs: TaskModel(model_config, HeadConfig("qa"), rngs=rngs)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(build(nnx.Rngs(0)), nnx.Param)))
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    loss_fn = step_lib.make_loss_fn(graphdef, config)
    grad_fn = jax.value_and_grad(lambda p, f, b, r: loss_fn(trainable.join(p, f), b, r),
                                 has_aux=True)
    return dict(params=params, grad_fn=grad_fn)


def qa_windows(count, seed):
    rng = np.random.default_rng(seed)
    return [dict(input_ids=rng.integers(3, V, T).astype(np.int32),
                 attention_mask=np.ones(T, np.int32), token_type_ids=np.zeros(T, np.int32),
                 weights=np.float32(1.0), start_positions=np.int32(rng.integers(0, T)),
                 end_positions=np.int32(rng.integers(0, T))) for _ in range(count)]


def test_qa_windows_of_one_question_are_clipped_as_one_unit(qa):
    questions = [qa_windows(2, 0), qa_windows(1, 1), qa_windows(2, 2), qa_windows(1, 3)]
    sample = poisson.PoissonBatch(questions, len(questions), 1.0, 4, 0, windows=2)
    batch = sample(0)  # Every question (rate 1): [4 questions, 2 windows, T].
    assert batch["input_ids"].shape == (4, 2, T)
    assert batch["weights"].tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]]
    run = jax.jit(lambda b, clip: dp.clipped_gradient_sum(
        qa["grad_fn"], qa["params"], {}, jax.tree.map(lambda x: x[None], b), None, clip,
        grouped=True))  # C traced: one program for every C.
    one = jax.jit(lambda b: qa["grad_fn"](qa["params"], {}, b, None)[1])
    windows = [flat(one(jax.tree.map(lambda x: x[None], w))) for w in questions[0]]
    _, _, norms = run(batch, math.inf)
    question = windows[0] + windows[1]  # The sum of its windows' gradients, clipped once.
    assert float(norms[0, 0]) == pytest.approx(np.linalg.norm(question), rel=1e-5)
    clip = 0.5 * min(np.linalg.norm(w) for w in windows)  # Each window alone exceeds C.
    full = flat(run(batch, clip)[0])
    removed = {**batch, "weights": batch["weights"] * (np.arange(4) != 0)[:, None]}
    gap = full - flat(run(removed, clip)[0])
    np.testing.assert_allclose(gap, question * clip / np.linalg.norm(question), rtol=1e-4,
                               atol=1e-7)
    assert np.linalg.norm(gap) <= clip * (1 + 1e-5)  # Not 2C, as two clipped windows would move it.
    with pytest.raises(ValueError, match="3 windows, more than dp.windows_per_example=2"):
        poisson.PoissonBatch([qa_windows(3, 4)], 1, 1.0, 4, 0, windows=2)(0)
    with pytest.raises(ValueError, match="1 training questions have more than dp.windows_per_exa"):
        poisson.check_windows([qa_windows(1, 5), qa_windows(3, 4)], 2)  # Before training.


@pytest.mark.parametrize("objective, changes, message", [
    ("lm", {"data.objective": "mlm"}, "needs data.objective='causal'"),
    ("seq2seq", {}, "clips one training example at a time, which is built for"),
    ("qa", {"dp.windows_per_example": 0}, "dp.windows_per_example must be ≥ 1"),
])
def test_bad_record_dp_configs_fail_with_the_fix(objective, changes, message):
    config = finetune_config("qa", "squad")
    config.objective = objective
    config.dp.update(enabled=True, noise_multiplier=1.0)
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        dp.resolve(config, lambda: 1000)
