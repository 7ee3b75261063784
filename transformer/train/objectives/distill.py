"""Knowledge distillation: a student trained on a frozen teacher's softened outputs (Hinton et al.
2015; DistilBERT, Sanh et al. 2019), in the one training loop.

    loss = α · T² · KL(teacher_T ‖ student_T) + (1 − α) · CE(labels) + β · (1 − cos(h_s, h_t))

`p_T = softmax(logits / T)`; the T² keeps the soft gradients' scale independent of T. The cosine
term compares the last hidden states (same width), as DistilBERT does. Every term is a sum over
the same weighted positions as the objective's own loss (real examples for sequence tasks,
labelled tokens for token classification, targets for causal/masked LM), so the step's division
by `weight_sum` averages over real tokens/examples, and microbatches and devices combine exactly.
The cosine term is, per row, the mean over its real tokens (padding and other packed segments'
padding excluded), weighted by the row's loss weight.

Objectives (`config.objective`), one per base objective the student learns:
`distill_classification`, `distill_token_classification`, `distill_lm` (causal or masked LM,
`data.objective`). The teacher (`distill.teacher`: a model checkpoint of ours, e.g. WORKDIR/best
of a fine-tuning run or `transformer.convert import` of a Hugging Face model) runs inside the same
jitted step, without gradients, its parameters sharded by the same logical-axis rules.
`distill.student_layers` ("0,2,4") builds the student from the teacher's architecture with those
layers and initializes it from them (embeddings and head too).

A transfer set (`distill.transfer_file`, classification): more sentences of the task, which the
student learns from the teacher alone (DistilBERT/TinyBERT-style): each step's batch is the
`data.global_batch_size` labelled examples followed by `distill.transfer_batch_size` transfer
examples whose `label_weights` are 0, so the label cross-entropy never reads their labels; the
soft and cosine terms cover both. All terms are divided by the step's total examples.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from transformer import model_io, paths, sharding
from transformer.data import tasks
from transformer.models import MODELS, ModelConfig
from transformer.models.common import split_rng
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import flops
from transformer.train import state as train_state
from transformer.train.losses import cross_entropy
from transformer.train.objectives import lm  # noqa: F401  (distill_lm's base, registered first)
from transformer.train.objectives.registry import (
    BEST_METRIC,
    Batch,
    Objective,
    get_objective,
    mean_of,
    register,
)
from transformer.train.objectives.tasks import head_config

BASES = ("classification", "token_classification", "lm")
HEAD_FILE = "head_config.json"  # As transformer/train/best.py writes it.


def default_config() -> ml_collections.ConfigDict:
    """`config.distill`: the fields every distillation recipe sets."""
    c = ml_collections.ConfigDict()
    c.teacher = ""  # The teacher's model checkpoint directory (ours, or imported from HF).
    c.temperature = 2.0  # T: both distributions are softmax(logits / T).
    c.alpha = 0.5  # Weight of T²·KL; the label cross-entropy gets 1 − α (α = 0: no teacher).
    c.beta = 0.0  # Weight of the hidden-state cosine loss (student and teacher of one width).
    c.student_layers = ""  # E.g. "0,2,4": the student is these teacher layers ("" = config.model).
    c.transfer_file = ""  # Classification: more examples (task format) learnt from the teacher alone.
    c.transfer_batch_size = 0  # Transfer examples added to each step's labelled batch.
    return c


# --- The losses (pure functions of logits and hidden states). ------------------------------


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float) -> jax.Array:
    """KL(p_teacher ‖ p_student) at temperature T over the last axis, per position (float32):
    Σ_v p_t(v) (log p_t(v) − log p_s(v)). The teacher is constant (no gradient)."""
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    log_p_t = jax.nn.log_softmax(teacher, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def cosine_distance(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """1 − cos(a, b) over the last axis (float32), with the norm product floored at `eps` as in
    PyTorch's cosine_similarity: a zero vector gives 1, with finite gradients."""
    a, b = a.astype(jnp.float32), jax.lax.stop_gradient(b.astype(jnp.float32))
    norms = jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), eps * eps))
    return 1.0 - jnp.sum(a * b, -1) / norms


def distillation_sums(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    targets: jax.Array,
    weights: jax.Array,
    *,
    temperature: float,
    alpha: float,
    beta: float = 0.0,
    student_hidden: jax.Array | None = None,
    teacher_hidden: jax.Array | None = None,
    token_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Sums over the weighted positions (`weights` has the shape of `targets`: [batch] or
    [batch, length]); divide by `weight_sum` for means. `token_mask` [batch, length] marks the
    real tokens for the cosine term (hidden states [batch, length, width]). `label_weights`
    (default `weights`) are the positions whose labels the cross-entropy reads: 0 on transfer
    examples, which only the teacher terms see; `label_sum` counts them."""
    weights = weights.astype(jnp.float32)
    labelled = weights if label_weights is None else label_weights.astype(jnp.float32)
    hard = cross_entropy(student_logits, targets, labelled, label_smoothing=label_smoothing,
                         z_loss=z_loss)
    sums = {"hard_sum": hard["loss_sum"], "nll_sum": hard["nll_sum"],
            "correct_sum": hard["correct_sum"], "label_sum": hard["weight_sum"],
            "weight_sum": jnp.sum(weights)}
    loss = (1.0 - alpha) * hard["loss_sum"]
    if teacher_logits is not None:
        sums["soft_sum"] = jnp.sum(kl_divergence(student_logits, teacher_logits, temperature)
                                   * weights)
        loss = loss + alpha * temperature**2 * sums["soft_sum"]
    if beta:
        mask = token_mask.astype(jnp.float32)
        per_row = (jnp.sum(cosine_distance(student_hidden, teacher_hidden) * mask, -1)
                   / jnp.maximum(mask.sum(-1), 1.0))
        row_weight = weights if weights.ndim == 1 else weights.sum(-1)
        sums["hidden_sum"] = jnp.sum(per_row * row_weight)
        loss = loss + beta * sums["hidden_sum"]
    sums["loss_sum"] = loss
    return sums


# --- The models' outputs: logits, last hidden states, targets and weights of one batch. ----


def _outputs(model: nnx.Module, batch: Batch, base: str,
             dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
    if base == "lm":
        out = model(batch["inputs"], token_type_ids=batch.get("token_type_ids"),
                    segment_ids=batch["segment_ids"], positions=batch["positions"],
                    dropout_rng=dropout_rng)
        return {"logits": out.logits, "hidden": out.last_hidden_state,
                "targets": batch["targets"], "weights": batch["weights"],
                "mask": batch["segment_ids"] > 0}
    # TaskModel.__call__, keeping the backbone's last hidden state.
    mask = batch["attention_mask"]
    token_types = batch.get("token_type_ids") if model.config.type_vocab_size else None
    backbone_rng, head_rng = split_rng(dropout_rng, 2)
    out = model.backbone(batch["input_ids"], mask, token_types, dropout_rng=backbone_rng,
                         compute_logits=False)
    logits = model.head(out, mask, batch.get("entity_positions"), head_rng)["logits"]
    labels, weights = batch["labels"], batch["weights"].astype(jnp.float32)
    if labels.ndim == 2:  # Tokens: only labelled positions of real examples are scored.
        weights = weights[:, None] * (labels != tasks.IGNORE)
    label_weights = weights * batch["label_weights"] if "label_weights" in batch else weights
    return {"logits": logits, "hidden": out.last_hidden_state,
            "targets": jnp.where(labels == tasks.IGNORE, 0, labels), "weights": weights,
            "label_weights": label_weights, "mask": mask > 0}


def _loss(base: str):
    def loss(model, batch, dropout_rng, config, teacher=None):
        d = config.distill
        student = _outputs(model, batch, base, dropout_rng)
        uses_teacher = d.alpha > 0 or d.beta > 0
        if uses_teacher and teacher is None:
            raise ValueError("distillation needs the teacher model: set --config.distill.teacher")
        t = _outputs(teacher, batch, base, None) if uses_teacher else {}
        return distillation_sums(
            student["logits"], t.get("logits"), student["targets"], student["weights"],
            temperature=d.temperature, alpha=d.alpha, beta=d.beta,
            student_hidden=student["hidden"], teacher_hidden=t.get("hidden"),
            token_mask=student["mask"], label_weights=student.get("label_weights"),
            label_smoothing=config.label_smoothing,
            z_loss=config.z_loss if base == "lm" else 0.0)
    return loss


def _summary(sums):
    labelled = jnp.maximum(sums["label_sum"], 1.0)  # Accuracy of the labelled positions only.
    out = {"loss": mean_of(sums, "loss_sum"),
           "hard_loss": mean_of(sums, "hard_sum"),
           "accuracy": sums["correct_sum"] / labelled, "weights": sums["weight_sum"]}
    for key in ("soft", "hidden"):
        if f"{key}_sum" in sums:
            out[f"{key}_loss"] = mean_of(sums, f"{key}_sum")
    return out


# --- Configs: the base objective's, the student's architecture, the teacher's. -------------


def inner_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` as the base objective (e.g. 'classification') reads it."""
    inner = ml_collections.ConfigDict(config.to_dict())
    inner.objective = config.objective.removeprefix("distill_")
    return inner


def _teacher_dir(config: ml_collections.ConfigDict) -> str:
    if not config.distill.teacher:
        raise ValueError(f"config.objective={config.objective!r} needs a teacher: set "
                         "--config.distill.teacher=DIR (a model checkpoint of ours: WORKDIR/best of "
                         "a fine-tuning run, or `python -m transformer.convert import` output)")
    return config.distill.teacher


def student_layers(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    text = str(config.distill.student_layers).strip()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"distill.student_layers={text!r}: give teacher layer indices, comma-"
                         "separated (e.g. '0,2,4')") from None


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """With `distill.student_layers`: the student is the teacher's architecture with that many
    layers (runtime fields as configured); data.tokenizer "" = the teacher's tokenizer/."""

    layers = student_layers(config)
    if not layers:
        return config
    if config.init_from:
        raise ValueError("distill.student_layers initializes the student from the teacher; "
                         "leave config.init_from empty (or set distill.student_layers='')")
    directory = _teacher_dir(config)
    teacher = model_io.read_config(directory)
    if not layers or min(layers) < 0 or max(layers) >= teacher.num_layers:
        raise ValueError(f"distill.student_layers={config.distill.student_layers!r}: the teacher "
                         f"{directory} has layers 0..{teacher.num_layers - 1}")
    config = ml_collections.ConfigDict(config.to_dict())
    runtime = {k: config.model[k] for k in model_io.RUNTIME_FIELDS}
    config.model = ml_collections.ConfigDict(
        {**teacher.to_dict(), **runtime, "num_layers": len(layers)})
    tokenizer = paths.as_path(directory) / model_io.TOKENIZER_DIR
    if not config.data.tokenizer and tokenizer.is_dir():
        config.data.tokenizer = str(tokenizer)
    return config


def _read_head(directory: str) -> HeadConfig | None:
    path = paths.as_path(directory) / HEAD_FILE
    return HeadConfig(**json.loads(path.read_text())) if path.is_file() else None


def check_compatible(config: ml_collections.ConfigDict, student: ModelConfig,
                     teacher: ModelConfig, teacher_head: HeadConfig | None,
                     directory: str) -> None:
    """Fails, naming the fix, where the teacher's logits cannot be compared with the student's."""
    base = config.objective.removeprefix("distill_")
    where = f"the teacher {directory}"
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"{where} has vocab_size {teacher.vocab_size} but the student {student.vocab_size}: "
            "teacher and student must share one tokenizer and vocabulary (set "
            f"--config.model.vocab_size={teacher.vocab_size} and the teacher's tokenizer)")
    if base == "lm":
        if teacher_head is not None:
            raise ValueError(f"{where} is a {teacher_head.kind!r} task model: its logits are over "
                             "labels, not the vocabulary; distill a language model from a plain "
                             "model checkpoint")
        if teacher.causal != student.causal:
            raise ValueError(
                f"{where} is a {teacher.architecture} (causal={teacher.causal}) but the student a "
                f"{student.architecture}: causal and masked LM logits predict different tokens; "
                "use a teacher of the student's family")
    else:
        student_head = head_config(inner_config(config))
        if teacher_head is None:
            raise ValueError(f"{where} has no {HEAD_FILE}: it is a plain {teacher.architecture}, "
                             f"whose logits are over the vocabulary, not the {base} labels; "
                             "fine-tune it on the task first (e.g. configs/glue.py) and distill "
                             "from WORKDIR/best")
        if (teacher_head.kind, teacher_head.num_labels) != (base, student_head.num_labels):
            raise ValueError(f"{where} is a {teacher_head.kind!r} model with "
                             f"{teacher_head.num_labels} labels; the student is {base!r} with "
                             f"{student_head.num_labels}: their logits are not comparable")
    if config.distill.beta and teacher.hidden_size != student.hidden_size:
        raise ValueError(f"distill.beta={config.distill.beta} compares hidden states, but {where} "
                         f"has width {teacher.hidden_size} and the student {student.hidden_size}; "
                         "set --config.distill.beta=0")


@dataclasses.dataclass
class Teacher:
    """The frozen teacher: its graphdef, its parameters (sharded arrays) and their shardings."""

    graphdef: nnx.GraphDef
    params: Any
    shardings: Any
    config: ModelConfig
    layers: tuple[int, ...]  # The teacher layers that initialize the student (() = none).

    def init_student(self, params: Any, params_sharding: Any) -> Any:
        """The student's parameters taken from the teacher's (`layers` of its layer stack), in
        the student's shardings; `params` unchanged without `distill.student_layers`."""
        if not self.layers:
            return params
        index = jnp.asarray(self.layers)
        flat_student = model_io.flat_params(params)
        flat_teacher = model_io.flat_params(self.params)
        if set(flat_student) != set(flat_teacher):
            raise ValueError("the student's parameters do not match the teacher's: "
                             f"{sorted(set(flat_student) ^ set(flat_teacher))}")

        def pick(teacher):
            out = {}
            for path, x in model_io.flat_params(teacher).items():
                in_stack = ".layers.blocks." in f".{path}"
                out[path] = x[index] if in_stack else x
                if out[path].shape != flat_student[path].shape:
                    raise ValueError(f"{path}: teacher {x.shape} → {out[path].shape}, student "
                                     f"{flat_student[path].shape}")
            return model_io.unflatten(out)

        return jax.jit(pick, out_shardings=params_sharding)(self.params)


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 rules: Any) -> Teacher:
    """The teacher of `distill.teacher`, checked against the student, restored straight into the
    shardings the rules give its parameters. Dropout off; the student's compute dtype."""
    directory = _teacher_dir(config)
    student = ModelConfig.from_dict(config.model.to_dict())
    saved = model_io.read_config(directory)
    head = _read_head(directory)
    check_compatible(config, student, saved, head, directory)
    teacher = saved.replace(dropout_rate=0.0, attention_dropout_rate=0.0, dtype=student.dtype,
                            attention_impl=student.attention_impl)
    if head is None:
        build = lambda rngs: MODELS[teacher.architecture](teacher, rngs=rngs)
    else:
        build = lambda rngs: TaskModel(teacher, head, rngs=rngs)
    abstract = train_state.abstract_model(teacher, build)
    shardings = train_state.param_shardings(teacher, mesh, rules, build)
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    params = model_io.load_params(directory, shapes, shardings)
    return Teacher(nnx.graphdef(abstract), params, shardings, teacher, student_layers(config))


# --- The objectives. ---------------------------------------------------------------------------


def _builder(model_config, config):
    return get_objective(config.objective.removeprefix("distill_")).builder(
        model_config, inner_config(config))


class WithTransfer(grain.DatasetIterator):
    """Each labelled batch followed by a transfer batch, `label_weights` 1 and 0; checkpointable
    (the two iterators' states)."""

    def __init__(self, labelled: grain.DatasetIterator, transfer: grain.DatasetIterator):
        super().__init__([labelled, transfer])
        self.labelled, self.transfer = labelled, transfer

    def __next__(self) -> dict[str, Any]:
        a, b = next(self.labelled), next(self.transfer)
        if set(a) != set(b):
            raise ValueError(f"distill.transfer_file gives batches of {sorted(b)}, the labelled "
                             f"data {sorted(a)}: give the transfer file the task's format")
        out = {k: np.concatenate([a[k], b[k]]) for k in a}
        out["label_weights"] = np.concatenate(
            [np.ones(len(a["weights"]), np.float32), np.zeros(len(b["weights"]), np.float32)])
        return out

    def get_state(self) -> dict[str, Any]:
        return {"labelled": self.labelled.get_state(), "transfer": self.transfer.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.labelled.set_state(state["labelled"])
        self.transfer.set_state(state["transfer"])


def _data(config, tokenizer, process_index, process_count):
    inner = inner_config(config)
    inner.data.pack_examples = False  # Rows of one example: the hidden term is a mean per row.
    base = get_objective(inner.objective)
    d = config.distill
    if not d.transfer_file and not d.transfer_batch_size:
        return base.train_data(inner, tokenizer, process_index, process_count)
    if inner.objective != "classification" or not d.transfer_file or d.transfer_batch_size < 1:
        raise ValueError(
            f"distill.transfer_file={d.transfer_file!r}, transfer_batch_size="
            f"{d.transfer_batch_size}: a transfer set is for distill_classification and needs "
            "both (a file in the task's format, and the examples it adds to each step)")
    if not (d.alpha > 0 or d.beta > 0):
        raise ValueError("distill.transfer_file is learnt from the teacher alone, but "
                         "distill.alpha = beta = 0: set alpha > 0 or drop the transfer set")
    multiple = config.grad_accum_steps * sharding.data_parallel_size(config.mesh.to_dict())
    if d.transfer_batch_size % multiple:
        raise ValueError(f"distill.transfer_batch_size={d.transfer_batch_size} must be a multiple "
                         f"of grad_accum_steps × data-parallel size = {multiple}")
    transfer = ml_collections.ConfigDict(inner.to_dict())
    transfer.data.local_files = {inner.data.train_split: d.transfer_file}
    transfer.data.dataset = ""
    transfer.data.global_batch_size = d.transfer_batch_size
    transfer.data.seed = inner.data.seed + 1  # Its own shuffle.
    return WithTransfer(base.train_data(inner, tokenizer, process_index, process_count),
                        base.train_data(transfer, tokenizer, process_index, process_count))


def _evaluator(config, *args, **kwargs):
    """The base objective's evaluation of the student (accuracy, F1, perplexity: no teacher)."""
    inner = inner_config(config)
    return get_objective(inner.objective).evaluator(inner, *args, **kwargs)


def _head_flops(model_config, config, seq_len):
    """The student's head, plus the teacher's whole forward pass (counted as a third of its
    training FLOPs: no backward pass) when the teacher runs."""
    inner = inner_config(config)
    own = get_objective(inner.objective).head_flops(model_config, inner, seq_len)
    d = config.distill
    if not (d.alpha > 0 or d.beta > 0) or not d.teacher:
        return own
    teacher = model_io.read_config(d.teacher)
    if inner.objective == "lm":
        teacher_head = flops.lm_head_flops(teacher)
    else:
        teacher_head = flops.task_head_flops(teacher, _read_head(d.teacher) or
                                             head_config(inner), seq_len)
    return own + (flops.backbone_flops(teacher, seq_len) + teacher_head) / flops.TRAIN_FACTOR


for _base in BASES:
    register(Objective(
        f"distill_{_base}", get_objective(_base).batch_axes, _builder, _loss(_base),
        _summary, _data, _evaluator, _head_flops, resolve=resolve, teacher=load_teacher))
    BEST_METRIC[f"distill_{_base}"] = BEST_METRIC[_base]
