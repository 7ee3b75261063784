"""Distillation: the loss terms against NumPy, their masking and scaling, the teacher inside the
jitted step (microbatches == big batch, sharded == one device), the student made of teacher
layers, the errors for teachers whose logits are not comparable, and the CI recipe end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from transformer import sharding
from transformer.models import MODELS, ModelConfig, get_preset
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import best, objectives, optimizer, trainer
from transformer.train import state as train_state
from transformer.train import step as step_lib
from transformer.train.config import finetune_config
from transformer.train.objectives import distill

B, T, V = 16, 16, 128
TINY = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=T,
            dropout_rate=0.0, attention_dropout_rate=0.0)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- The loss terms. ---------------------------------------------------------------------------


def test_kl_has_the_teacher_to_student_direction():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    for temp in (1.0, 2.0, 4.0):
        p_s, p_t = softmax(s / temp), softmax(t / temp)
        forward = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)  # KL(teacher ‖ student)
        reverse = (p_s * (np.log(p_s) - np.log(p_t))).sum(-1)
        got = np.asarray(distill.kl_divergence(jnp.asarray(s), jnp.asarray(t), temp))
        np.testing.assert_allclose(got, forward, rtol=1e-5, atol=1e-6)
        assert np.abs(got - reverse).max() > 1e-2
    # No gradient reaches the teacher.
    g = jax.grad(lambda t: distill.kl_divergence(jnp.asarray(s), t, 2.0).sum())(jnp.asarray(t))
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("temp", [0.5, 1.0, 3.0, 20.0])
def test_self_distillation_gives_zero_soft_loss(temp):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9, 11)) * 5, jnp.float32)
    assert float(jnp.abs(distill.kl_divergence(logits, logits, temp)).max()) == 0.0


def test_the_temperature_squared_scaling():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    w, y = np.ones(3, np.float32), np.array([0, 1, 2])
    for temp in (1.0, 2.0, 5.0):
        sums = distill.distillation_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                         jnp.asarray(w), temperature=temp, alpha=0.3)
        kl = (softmax(t / temp) * (np.log(softmax(t / temp)) - np.log(softmax(s / temp)))).sum()
        np.testing.assert_allclose(float(sums["soft_sum"]), kl, rtol=1e-5)
        np.testing.assert_allclose(float(sums["loss_sum"]),
                                   0.3 * temp**2 * kl + 0.7 * float(sums["hard_sum"]), rtol=1e-5)
    # The gradient of T²·KL is T·(p_s − p_t); with T², it keeps its size as T grows (Hinton et
    # al.): it tends to (Δz − mean Δz) / V, the error shrinking as 1/T.
    limit = ((s - t) - (s - t).mean(-1, keepdims=True)) / s.shape[-1]
    errors = []
    for temp in (1.0, 10.0, 20.0):
        grad = np.asarray(jax.grad(lambda z, temp=temp: temp**2 * distill.kl_divergence(
            z, jnp.asarray(t), temp).sum())(jnp.asarray(s)))
        np.testing.assert_allclose(grad, temp * (softmax(s / temp) - softmax(t / temp)),
                                   rtol=1e-4, atol=1e-6)
        errors.append(np.abs(grad - limit).max())
    assert errors[2] < 0.1 * np.abs(limit).max() and errors[2] < 0.6 * errors[1]


def test_padded_and_packed_positions_contribute_nothing():
    """Positions of weight 0 (padding, a packed row's segment ends, unlabelled subwords) and the
    hidden states of padding tokens may hold anything."""
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 8, 5)), rng.normal(size=(2, 8, 5))
    hs, ht = rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 4))
    segments = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    weights = ((segments == np.roll(segments, -1, 1)) & (segments > 0)).astype(np.float32)
    weights[:, -1] = 0
    y = rng.integers(0, 5, (2, 8))

    def sums(s, t, hs, ht):
        return distill.distillation_sums(
            jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), jnp.asarray(weights), temperature=2.0,
            alpha=0.5, beta=1.0, student_hidden=jnp.asarray(hs), teacher_hidden=jnp.asarray(ht),
            token_mask=jnp.asarray(segments > 0))

    ref = sums(s, t, hs, ht)
    off, pad = weights == 0, segments == 0
    junk = lambda x, where: np.where(where[..., None], rng.normal(size=x.shape) * 100, x)
    got = sums(junk(s, off), junk(t, off), junk(hs, pad), junk(ht, pad))
    for k in ref:
        np.testing.assert_allclose(float(got[k]), float(ref[k]), rtol=1e-6)
    # Means are over real (weighted) positions, not rows: 10 of the 16.
    assert float(ref["weight_sum"]) == weights.sum() == 10


def test_zero_norm_hidden_rows_stay_finite():
    a = jnp.zeros((2, 3, 8)).at[0, 0].set(1.0)
    b = jnp.ones((2, 3, 8)).at[1, 2].set(0.0)
    d = distill.cosine_distance(a, b)
    assert np.all(np.isfinite(np.asarray(d)))
    np.testing.assert_allclose(np.asarray(d)[1], 1.0)  # A zero vector: cosine 0.
    grad = jax.grad(lambda a: distill.cosine_distance(a, b).sum())(a)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(float(distill.cosine_distance(b[0], b[0]).max()), 0.0, atol=1e-6)


# --- The teacher in the jitted step. -----------------------------------------------------------


def save_teacher(directory, head=True, **changes):
    config = get_preset("bert-tiny", **{**TINY, **changes})
    rngs = nnx.Rngs(7)
    if head:
        model = TaskModel(config, HeadConfig("classification", 2, "cls"), rngs=rngs)
        model.head.kernel[...] *= 100  # Confident logits: a soft loss well above rounding.
    else:
        model = MODELS[config.architecture](config, rngs=rngs)
    best.save_task_model(directory, model)
    return str(directory)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"))


def distill_config(teacher, **changes):
    c = finetune_config("distill_classification", "sst2", "bert-tiny")
    c.model.update(TINY)
    c.distill = distill.default_config()
    c.distill.update(teacher=teacher, temperature=2.0, alpha=0.6, beta=0.5, student_layers="1")
    c.finetune.pooling = "cls"
    c.data.global_batch_size, c.data.max_length = B, T
    c.learning_rate, c.warmup_steps, c.num_train_steps = 1e-3, 1, 10
    c.update(changes)
    return c


def make_batches(n, seed=0):
    """Classification rows with right padding, 2 of each 16 rows weight-0 padding rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(4, T + 1, (B, 1))
        mask = (np.arange(T)[None] < lengths).astype(np.int32)
        out.append(dict(input_ids=(rng.integers(1, V, (B, T)) * mask).astype(np.int32),
                        attention_mask=mask, token_type_ids=np.zeros((B, T), np.int32),
                        labels=rng.integers(0, 2, (B,)).astype(np.int32),
                        weights=(np.arange(B) % 8 != 7).astype(np.float32)))
    return out


def setup(config, mesh):
    config = distill.resolve(config)
    objective = objectives.get_objective(config.objective)
    rules = [tuple(r) for r in config.logical_axis_rules]
    model_config = ModelConfig.from_dict(config.model.to_dict())
    build = objective.builder(model_config, config)
    tx, schedule = optimizer.make_optimizer(config)
    init = train_state.make_init_fn(model_config, tx, config.seed, build)
    shapes = jax.eval_shape(init)
    params_sharding = train_state.param_shardings(model_config, mesh, rules, build)
    shardings = train_state.state_shardings(shapes, params_sharding, mesh)
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        objective.batch_axes, rules, (B, T), mesh))
    teacher = objective.teacher(config, mesh, rules)
    step = step_lib.make_train_step(graphdef, tx, schedule, config, shardings, batch_sharding,
                                    teacher)
    with sharding.use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
        state = state.replace(params=teacher.init_student(state.params, params_sharding))
    return state, step, batch_sharding, rules, teacher


def train(config, mesh, batches):
    """(final state, metrics of each step, initial student params, teacher)."""
    state, step, batch_sharding, rules, teacher = setup(config, mesh)
    initial = jax.tree.map(np.asarray, state.params)
    metrics = []
    with sharding.use_mesh(mesh, rules):
        for batch in batches:
            state, m = step(state, trainer.to_global(batch, batch_sharding))
            metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics, initial, teacher


def student_config(teacher_dir, **changes):
    """A randomly initialized student (another seed than the teacher's): a sizable soft loss."""
    config = distill_config(teacher_dir, **changes)
    config.distill.student_layers = ""
    return config


@pytest.fixture(scope="module")
def reference_run(teacher_dir):
    return train(student_config(teacher_dir), sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
                 make_batches(2))


def test_the_student_starts_from_the_chosen_teacher_layers(teacher_dir):
    state, _, _, _, teacher = setup(distill_config(teacher_dir, num_train_steps=1),
                                    sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    s, t = state.params, teacher.params
    np.testing.assert_array_equal(s["backbone"]["layers"]["blocks"]["mlp"]["wi"][0],
                                  t["backbone"]["layers"]["blocks"]["mlp"]["wi"][1])
    np.testing.assert_array_equal(s["head"]["kernel"], t["head"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, s["backbone"]["embeddings"],
                 t["backbone"]["embeddings"])


def test_self_distillation_in_the_step_has_zero_soft_and_hidden_loss(teacher_dir):
    config = distill_config(teacher_dir, num_train_steps=1)
    config.distill.student_layers = "0,1"
    config = distill.resolve(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    teacher = distill.load_teacher(config, mesh, [tuple(r) for r in config.logical_axis_rules])
    model = nnx.merge(teacher.graphdef, teacher.params)
    batch = {k: jnp.asarray(v) for k, v in make_batches(1)[0].items()}
    sums = objectives.get_objective(config.objective).loss(model, batch, None, config,
                                                           teacher=model)
    assert float(sums["soft_sum"]) == 0.0
    assert abs(float(sums["hidden_sum"])) < 1e-5
    assert float(sums["weight_sum"]) == 14  # Real examples, not rows.


def test_four_microbatches_equal_the_big_batch(teacher_dir, reference_run):
    _, ref, _, _ = reference_run
    _, got, _, _ = train(student_config(teacher_dir, grad_accum_steps=4),
                         sharding.make_mesh((1, 1, 1), jax.devices()[:1]), make_batches(2))
    for key in ("loss", "soft_loss", "hidden_loss", "hard_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=2e-5,
                                   err_msg=key)
    assert ref[0]["soft_loss"] > 0.1


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)])
def test_sharded_distillation_equals_one_device(teacher_dir, reference_run, shape):
    ref_state, ref, _, _ = reference_run
    state, got, _, _ = train(student_config(teacher_dir), sharding.make_mesh(shape),
                             make_batches(2))
    for key in ("loss", "soft_loss", "hidden_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=2e-5,
                                   atol=1e-7, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=5e-5),
                 state.params, ref_state.params)


# --- Teachers whose logits are not comparable. -------------------------------------------------


def test_a_student_with_another_vocabulary_is_refused(teacher_dir):
    config = distill_config(teacher_dir, num_train_steps=1)
    config.distill.student_layers = ""
    config.model.vocab_size = 2 * V
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"vocab_size 128 but the student 256.*one tokenizer"):
        distill.load_teacher(config, mesh, sharding.DEFAULT_RULES)


def test_teachers_of_another_family_are_refused(tmp_path, teacher_dir):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plain = save_teacher(tmp_path / "plain", head=False)
    with pytest.raises(ValueError, match="no head_config.json.*fine-tune it on the task first"):
        distill.load_teacher(distill_config(plain), mesh, sharding.DEFAULT_RULES)
    # A causal (GPT-2) teacher for a masked-LM (BERT) student.
    gpt = get_preset("gpt2-tiny", **TINY)
    best.save_task_model(tmp_path / "gpt", MODELS["decoder"](gpt, rngs=nnx.Rngs(0)))
    config = distill_config(str(tmp_path / "gpt"), objective="distill_lm")
    config.distill.student_layers = ""
    with pytest.raises(ValueError, match="causal and masked LM logits"):
        distill.load_teacher(config, mesh, sharding.DEFAULT_RULES)
    # A classification teacher cannot teach an LM student.
    config = distill_config(teacher_dir, objective="distill_lm")
    with pytest.raises(ValueError, match="logits are over labels, not the vocabulary"):
        distill.load_teacher(config, mesh, sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="needs a teacher"):
        distill.resolve(distill_config(""))
    config = distill_config(teacher_dir)
    config.distill.student_layers = "0,2"
    with pytest.raises(ValueError, match="has layers 0..1"):
        distill.resolve(config)


# --- The recipe. -------------------------------------------------------------------------------


def test_ci_recipe_trains_a_student_from_the_teacher(tmp_path, fixtures):
    from tests.finetune.conftest import load_recipe

    base = load_recipe("distill", "ci")
    teacher = get_preset("bert-tiny", **{**base.model.to_dict(), "num_layers": 2})
    best.save_task_model(tmp_path / "teacher", TaskModel(
        ModelConfig.from_dict(teacher.to_dict()), HeadConfig("classification", 2, "pooler"),
        rngs=nnx.Rngs(0)))
    config = load_recipe("distill", "ci")
    config.distill.teacher = str(tmp_path / "teacher")
    config.num_train_steps, config.eval_every = 4, 4
    config.data.cache_dir = str(tmp_path / "cache")
    for split, name, n in (("train", "train.tsv", 41), ("validation", "dev.tsv", 20)):
        with open(fixtures / "sst2" / name) as f:  # A header and the first examples.
            (tmp_path / name).write_text("".join(next(f) for _ in range(n)))
        config.data.local_files[split] = str(tmp_path / name)
    out = trainer.train_and_evaluate(config, tmp_path / "run")
    m = out["metrics"]
    assert out["model_config"].num_layers == 1
    assert np.isfinite(m["loss"]) and m["soft_loss"] >= 0 and 0 <= m["eval_accuracy"] <= 1
    assert (tmp_path / "run" / "best" / "head_config.json").is_file()
    control = load_recipe("distill", "control,ci")
    assert control.distill.alpha == 0 and control.distill.student_layers == "0"
