"""DP-SGD (transformer/train/dp.py): per-example gradients, the sensitivity bound, the noise, the
accountant against dp_accounting, Opacus parity, the sharded step, and bad configs."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tests.hf.tiny_models import _BERT
from transformer import sharding
from transformer.hf import load_hf_model
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import dp, trainable, trainer
from transformer.train import state as train_state
from transformer.train import step as step_lib
from transformer.train.config import finetune_config
from transformer.train.state import TrainState

B, T, LABELS = 8, 12, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BertForSequenceClassification and our task model with its weights."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        **{**_BERT, "num_hidden_layers": 1}, num_labels=LABELS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("dp") / "bert"
    hf.save_pretrained(path, safe_serialization=True)
    backbone = load_hf_model(path)
    model_config = backbone.config
    head = HeadConfig("classification", LABELS, "pooler", 0.0)
    build = lambda rngs: TaskModel(model_config, head, rngs=rngs)
    params = jax.device_get({  # Host arrays: the steps under test donate their device state.
        "backbone": nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
        "head": {"kernel": hf.classifier.weight.detach().numpy().T,
                 "bias": hf.classifier.bias.detach().numpy()}})
    config = finetune_config("classification", "sst2")
    config.model.update(model_config.to_dict())
    config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
    config.finetune.classifier_dropout = 0.0
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    return dict(hf=hf, path=path, params=params, config=config, graphdef=graphdef,
                model_config=model_config, build=build)


def make_batch(seed=0, real=B, rows=B):
    """Padded classification rows; rows past `real` are weight-0 padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, T + 1, rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, _BERT["vocab_size"] - 1, (rows, T)), 0).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                labels=rng.integers(0, LABELS, rows).astype(np.int32),
                weights=(np.arange(rows) < real).astype(np.float32))


@pytest.fixture(scope="module")
def grad_fn(tiny):
    loss_fn = step_lib.make_loss_fn(tiny["graphdef"], tiny["config"])
    return jax.value_and_grad(lambda p, f, batch, rng: loss_fn(trainable.join(p, f), batch, rng),
                              has_aux=True)


@pytest.fixture(scope="module")
def clipped_sum(grad_fn):
    """Jitted Σ clip_C(∇ℓ_i) over microbatches of 4, and the per-example norms."""
    def run(params, batch, clip):
        mbs = jax.tree.map(lambda x: x.reshape(-1, 4, *x.shape[1:]), batch)
        total, sums, norms = dp.clipped_gradient_sum(grad_fn, params, {}, mbs, None, clip)
        return total, sums, norms.reshape(-1)
    return jax.jit(run)


@pytest.fixture(scope="module")
def single_grads(tiny, grad_fn):
    """Reference: the gradient of every example as a batch of one (float32), flattened."""
    one = jax.jit(lambda p, b: grad_fn(p, {}, b, None)[1])
    batch = make_batch(1)
    return [flat(one(tiny["params"], {k: v[i:i + 1] for k, v in batch.items()}))
            for i in range(B)], batch


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_per_example_gradients_equal_single_example_batches(tiny, clipped_sum, single_grads):
    reference, batch = single_grads
    for i in (0, 3, 6):  # The clipped sum of a batch holding example i alone is its gradient.
        alone = {**batch, "weights": (np.arange(B) == i).astype(np.float32)}
        total, _, norms = clipped_sum(tiny["params"], alone, math.inf)
        np.testing.assert_allclose(flat(total), reference[i], rtol=1e-5, atol=1e-7)
        assert float(norms[i]) == pytest.approx(np.linalg.norm(reference[i]), rel=1e-5)
    _, _, norms = clipped_sum(tiny["params"], batch, math.inf)
    np.testing.assert_allclose(norms, [np.linalg.norm(g) for g in reference], rtol=1e-5)


def test_clipped_sum_matches_numpy_and_obeys_the_sensitivity_bound(tiny, clipped_sum, single_grads):
    reference, batch = single_grads
    clip = 0.5 * float(np.median([np.linalg.norm(g) for g in reference]))  # Half are clipped.
    expected = sum(g * min(1.0, clip / np.linalg.norm(g)) for g in reference)
    f = lambda b: flat(clipped_sum(tiny["params"], b, clip)[0])
    full = f(batch)
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-7)
    for i in range(B):
        removed = {**batch, "weights": batch["weights"] * (np.arange(B) != i)}  # Add/remove-one.
        gap = np.linalg.norm(full - f(removed))
        assert gap <= clip * (1 + 1e-5)
        assert gap >= 0.99 * min(clip, np.linalg.norm(reference[i]))  # Tight: one clipped gradient.
    other = make_batch(seed=7)
    for i in (0, 5):  # Replace-one: example i swapped for another example.
        replaced = {k: np.where(np.arange(B).reshape(-1, *[1] * (v.ndim - 1)) == i, other[k], v)
                    for k, v in batch.items()}
        assert np.linalg.norm(full - f(replaced)) <= 2 * clip * (1 + 1e-5)


def setup_step(tiny, mesh, tx, dp_changes=None, batch=B):
    """A jitted train step of the tiny classifier on `mesh`, and its state."""
    config = tiny["config"].copy_and_resolve_references()
    config.data.global_batch_size = batch
    if dp_changes is not None:
        config.dp.update(enabled=True, expected_batch_size=B, microbatch_size=4, **dp_changes)
    rules = [tuple(r) for r in config.logical_axis_rules]
    params_sharding = train_state.param_shardings(tiny["model_config"], mesh, rules, tiny["build"])
    params = jax.tree.map(jax.device_put, tiny["params"], params_sharding)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(1)),
                       skipped=jnp.zeros((), jnp.int32), bad_streak=jnp.zeros((), jnp.int32))
    shardings = train_state.state_shardings(jax.eval_shape(lambda: state), params_sharding, mesh)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, (batch,), mesh))
    step = step_lib.make_train_step(tiny["graphdef"], tx, optax.constant_schedule(1.0), config,
                                    shardings, batch_sharding)
    return jax.device_get(state), shardings, step, batch_sharding, rules


def run_steps(tiny, mesh, tx, dp_changes, batches, compiled=None):
    state, shardings, step, batch_sharding, rules = compiled or setup_step(tiny, mesh, tx,
                                                                            dp_changes)
    state = jax.device_put(state, shardings)  # Fresh buffers: the step donates them.
    with sharding.use_mesh(mesh, rules):
        for batch in batches:
            state, metrics = step(state, trainer.to_global(batch, batch_sharding))
    return jax.device_get(state.params), jax.device_get(metrics)


def one_device():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


NOISY = dict(clip_norm=0.05, noise_multiplier=1.0)  # Clipping active, noise on.


@pytest.fixture(scope="module")
def noisy_step(tiny):
    """The private step (plain SGD, learning rate 1) on one device, compiled once."""
    return setup_step(tiny, one_device(), optax.sgd(1.0), NOISY)


def test_without_noise_or_clipping_the_update_is_non_private_training(tiny):
    batches = [make_batch(s) for s in (2, 3)]
    tx = optax.sgd(0.5)
    private, metrics = run_steps(tiny, one_device(), tx, dict(clip_norm=math.inf,
                                                             noise_multiplier=0.0), batches)
    plain, _ = run_steps(tiny, one_device(), tx, None, batches)
    np.testing.assert_allclose(flat(private), flat(plain), rtol=1e-5, atol=1e-6)
    assert float(metrics["dp_batch_examples"]) == B and float(metrics["dp_clipped_fraction"]) == 0


def test_the_sharded_private_step_equals_one_device(tiny, noisy_step):
    batches = [make_batch(s, real=6) for s in (4, 5)]  # Noise and padding, clipping active.
    mesh = sharding.make_mesh((2, 2, 2))  # data × fsdp × tensor over the 8 simulated devices.
    sharded, _ = run_steps(tiny, mesh, optax.sgd(1.0), NOISY, batches)
    single, _ = run_steps(tiny, one_device(), None, None, batches, noisy_step)
    np.testing.assert_allclose(flat(sharded), flat(single), rtol=1e-5, atol=2e-6)


def test_the_noise_has_the_configured_standard_deviation(tiny, noisy_step):
    padding = make_batch(real=0)  # No example: the update is the noise alone, / expected batch.
    first, metrics = run_steps(tiny, one_device(), None, None, [padding], noisy_step)
    assert float(metrics["dp_batch_examples"]) == 0
    noise = flat(tiny["params"]) - flat(first)
    std = NOISY["noise_multiplier"] * NOISY["clip_norm"] / B
    assert noise.size > 10_000
    assert abs(noise.std() / std - 1) < 4 / math.sqrt(2 * noise.size)  # 4 standard errors.
    assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
    assert scipy.stats.kstest(noise, "norm", args=(0, std)).pvalue > 1e-3
    # The next step (the state's step counter folds into the key) draws fresh noise.
    state, *rest = noisy_step
    second, _ = run_steps(tiny, one_device(), None, None, [padding],
                          (state.replace(step=state.step + 1), *rest))
    second = flat(tiny["params"]) - flat(second)
    assert abs(np.corrcoef(noise, second)[0, 1]) < 0.05


def test_opacus_gives_the_same_clipped_noise_free_update(tiny, clipped_sum):
    import opacus

    real, expected, clip, lr = 6, 8, 0.05, 1.0
    batch = make_batch(seed=9, real=real)
    model = transformers.BertForSequenceClassification.from_pretrained(tiny["path"]).train()
    # The mean loss over the realized batch, as Opacus users write it: Opacus rescales the
    # per-sample gradients, clips them, sums and divides by the expected batch size.
    module = opacus.GradSampleModule(model, loss_reduction="mean")
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=expected, loss_reduction="mean")
    t = {k: torch.from_numpy(v[:real]).long() for k, v in batch.items() if k != "weights"}
    positions = torch.arange(T).expand(real, T)  # Per example: Opacus needs the batch dim.
    logits = module(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                    token_type_ids=t["token_type_ids"], position_ids=positions).logits
    torch.nn.functional.cross_entropy(logits, t["labels"]).backward()
    optimizer.step()
    updated = tiny["path"].parent / "opacus"
    model.save_pretrained(updated, safe_serialization=True)
    theirs = {"backbone": nnx.to_pure_dict(nnx.state(load_hf_model(updated), nnx.Param)),
              "head": {"kernel": model.classifier.weight.detach().numpy().T,
                       "bias": model.classifier.bias.detach().numpy()}}

    total, _, norms = clipped_sum(tiny["params"], batch, clip)
    assert np.mean(np.asarray(norms)[:real] > clip) > 0.5  # The clipping is what is compared.
    grads = jax.tree.map(lambda g: g / expected, total)
    ours = jax.tree.map(lambda p, g: p - lr * g, tiny["params"], grads)
    update_ours = flat(ours) - flat(tiny["params"])
    update_theirs = flat(theirs) - flat(tiny["params"])
    np.testing.assert_allclose(update_theirs, update_ours, atol=1e-5 * np.abs(update_ours).max())


def test_epsilon_equals_dp_accounting():
    q, sigma, steps, delta = 0.04, 1.5, 2250, 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    for kind, accountant in (("rdp", dp_accounting.rdp.RdpAccountant()),
                             ("pld", dp_accounting.pld.PLDAccountant())):
        accountant.compose(event)
        assert dp.epsilon(sigma, q, steps, delta, kind) == pytest.approx(
            accountant.get_epsilon(delta), rel=1e-9)
    assert dp.epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(7.33, abs=0.01)
    assert dp.epsilon(sigma, q, steps, delta, "pld") < dp.epsilon(sigma, q, steps, delta, "rdp")
    assert dp.Accountant(sigma, q, delta).metrics(steps)["dp_epsilon"] == pytest.approx(7.33, abs=0.01)


def test_noise_is_calibrated_to_a_target_epsilon():
    q, steps, delta = 0.04, 2250, 1e-5
    target = dp.epsilon(1.5, q, steps, delta)
    sigma = dp.calibrate_noise(target, q, steps, delta)
    assert sigma == pytest.approx(1.5, rel=1e-3)
    assert dp.epsilon(sigma, q, steps, delta) <= target
    assert dp.epsilon(sigma * 0.99, q, steps, delta) > target  # The smallest such σ.
    with pytest.raises(ValueError, match="cannot be reached in 2250 steps"):
        dp.calibrate_noise(1e-4, q, steps, delta)
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        dp.calibrate_noise(0.0, q, steps, delta)


@pytest.mark.parametrize("changes, message", [
    (dict(clip_norm=0.0), "clip_norm must be > 0"),
    (dict(clip_norm=-1.0), "clip_norm must be > 0"),
    (dict(noise_multiplier=None), "set exactly one of dp.noise_multiplier"),
    (dict(target_epsilon=3.0), "set exactly one of dp.noise_multiplier"),
    (dict(accountant="moments"), "dp.accountant must be 'rdp' or 'pld'"),
    (dict(delta=2.0), "dp.delta must lie in"),
])
def test_bad_dp_configs_fail_with_the_field_and_the_fix(changes, message):
    config = finetune_config("classification", "sst2")
    config.dp.update(enabled=True, noise_multiplier=1.0)
    config.dp.update(changes)
    with pytest.raises(ValueError, match=message):
        dp.resolve(config, lambda: 1000)


def test_private_training_refuses_objectives_it_does_not_clip_by_example_and_unreachable_targets():
    config = finetune_config("classification", "sst2")
    config.objective = "distill_classification"
    config.dp.update(enabled=True, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clips one training example at a time"):
        dp.resolve(config, lambda: 1000)
    config = finetune_config("classification", "sst2")
    config.num_train_steps = 10_000
    config.dp.update(enabled=True, target_epsilon=0.01, expected_batch_size=500)
    with pytest.raises(ValueError, match="cannot be reached in 10000 steps"):
        dp.resolve(config, lambda: 1000)


def test_resolve_pads_the_batch_switches_off_packing_and_calibrates():
    config = finetune_config("classification", "sst2")
    config.num_train_steps = 300
    config.dp.update(enabled=True, target_epsilon=3.0, microbatch_size=8)
    resolved, accountant = dp.resolve(config, lambda: 2000)
    d = resolved.dp
    assert (d.dataset_size, d.expected_batch_size, d.delta) == (2000, 32, 1 / 2000)
    assert not resolved.data.pack_examples and config.data.pack_examples
    assert resolved.data.global_batch_size % 8 == 0
    # The padded rows hold the batch but with probability ~3e-7 (binomial tail, exactly).
    assert scipy.stats.binom.sf(resolved.data.global_batch_size, 2000, 32 / 2000) < 1e-6
    assert accountant.epsilon(300) == pytest.approx(3.0, rel=1e-3) and accountant.epsilon(300) <= 3
    plain = finetune_config("classification", "sst2")
    assert dp.resolve(plain, lambda: 1) == (plain, None)  # Off: unchanged, nothing counted.


def test_the_batch_spec_is_used_for_per_example_sharding():
    mesh = sharding.make_mesh((2, 4, 1))
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    assert dp.spmd_axes(spec, 16) == ("data", "fsdp")
    with pytest.raises(ValueError, match="multiple of the data-parallel size 8"):
        dp.spmd_axes(spec, 4)


def test_the_trainer_runs_dp_sgd_and_reports_epsilon(tmp_path):
    """The recipe variant end to end on the repository's SST-2 sample, sharded over the 8
    devices (fsdp): Poisson batches, the private step, and ε in the final metrics (checked
    against dp_accounting directly)."""
    from tests.finetune.conftest import load_recipe

    config = load_recipe("glue", "sst2,dp,ci")
    config.model.update(num_layers=1, max_length=16)
    config.data.update(max_length=16, cache_dir=str(tmp_path / "cache"), prefetch_buffer_size=0)
    config.num_train_steps, config.eval_every = 2, 0  # Evaluation is the non-private code.
    config.dp.update(expected_batch_size=10, microbatch_size=8)
    result = trainer.train_and_evaluate(config, tmp_path / "run")
    resolved, metrics = result["config"].dp, result["metrics"]
    n = 200  # tests/fixtures/sst2/train.tsv
    assert (resolved.dataset_size, resolved.delta) == (n, 1 / n)
    assert not result["config"].data.pack_examples
    assert result["config"].data.global_batch_size == 32  # 10 + 5·√9.5 → a multiple of 8.
    a = dp_accounting
    accountant = a.rdp.RdpAccountant()
    accountant.compose(a.SelfComposedDpEvent(a.PoissonSampledDpEvent(
        10 / n, a.GaussianDpEvent(resolved.noise_multiplier)), 2))
    assert metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1 / n), rel=1e-9)
    assert metrics["dp_epsilon"] <= 8.0 and metrics["dp_noise_multiplier"] > 0
    assert 0 < metrics["dp_batch_examples"] <= 32
