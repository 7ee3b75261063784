"""The training loop: one linear function, in phases.

mesh → data → model and optimizer → shardings → jitted steps → restore → loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from transformer import model_io, paths, sharding
from transformer.data import task_packing
from transformer.data.tokenizer import Tokenizer, load_tokenizer
from transformer.models import ModelConfig
from transformer.train import best as best_lib
from transformer.train import (
    checkpointing,
    distributed,
    dp,
    flops,
    layer_decay,
    objectives,
    optimizer,
    resume,
    trainable,
)
from transformer.train import state as train_state
from transformer.train import step as train_step_lib
from transformer.train.distributed import any_process_has, to_global
from transformer.train.metrics_log import MetricLog


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) the run described by `config` in `workdir`; returns the last metrics.

    What is trained is `config.objective` (pretraining LM or a fine-tuning task): the objective
    supplies the model, the batches, the loss and the evaluation; this loop knows none of them.
    """
    # --- Set-up: processes, workdir, configs. -------------------------------------------------
    check_values(config)
    distributed.initialize(config)
    workdir = prepare_workdir(workdir)
    config = resolve_config(config)
    objective = objectives.get_objective(config.objective)
    config, accountant = dp.resolve(config, lambda: objective.dataset_size(  # DP-SGD: n, q, σ.
        config, lambda: get_tokenizer(config)), jax.process_count())
    privacy = accountant.metrics if accountant else lambda steps: {}  # ε spent after `steps`.
    if objective.resolve is not None:  # E.g. distillation: the student from the teacher's layers.
        config = objective.resolve(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    rules = [tuple(r) for r in config.logical_axis_rules]

    # --- Mesh. ------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.to_dict())
    check_batch(config, mesh)

    # --- Data. ------------------------------------------------------------------------------
    tokenizer = get_tokenizer(config)
    check_vocab(model_config, tokenizer)
    build = objective.builder(model_config, config)
    train_iter = objective.train_data(config, tokenizer, jax.process_index(), jax.process_count())

    # --- Model, optimizer and their shardings (computed before anything is allocated). --------
    tx, schedule = optimizer.make_optimizer(config)
    tx = layer_decay.with_layer_decay(tx, config.finetune.layer_decay, model_config.num_layers)
    init_fn = train_state.make_run_init_fn(config, model_config, tx, build)
    shapes = jax.eval_shape(init_fn)
    if (trains := trainable.predicate(config)) is not None:
        n_train, n_total = trainable.count(shapes.params, trains)
        logging.info("trainable: %d of %d parameters (%.3f%%): LoRA adapters and "
                     "finetune.train_also", n_train, n_total, 100 * n_train / n_total)
    params_sharding = train_state.param_shardings(model_config, mesh, rules, build)
    shardings = train_state.state_shardings(shapes, params_sharding, mesh)
    graphdef = nnx.graphdef(train_state.abstract_model(model_config, build))
    seq_len = config.data.max_length
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        objective.batch_axes, rules, (config.data.global_batch_size, seq_len), mesh))

    # A frozen model the loss reads (a distillation teacher), restored into its shardings.
    teacher = objective.teacher(config, mesh, rules) if objective.teacher is not None else None

    # --- Jitted steps. ----------------------------------------------------------------------
    train_step = train_step_lib.make_train_step(
        graphdef, tx, schedule, config, shardings, batch_sharding, teacher, objective)
    evaluator = objective.evaluator(config, tokenizer, graphdef, params_sharding, batch_sharding,
                                    workdir=workdir) if config.eval_every else None

    # --- Restore the latest checkpoint, or initialize (optionally from pretrained params). ----
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", save_every=config.checkpoint_every,
        max_to_keep=config.keep_checkpoints, keep_period=config.keep_period,
        async_save=config.async_checkpointing,
    )
    with sharding.use_mesh(mesh, rules):
        latest, state = checkpointer.restore_newest(
            train_state.abstract_state(shapes, shardings), train_iter)
        if latest is not None:
            logging.info("resumed from %s", checkpointer.directory / str(latest))
            resume.check_config(checkpointer.restore_config(latest), config, latest)
        else:
            state = jax.jit(init_fn, out_shardings=shardings)()
            if config.init_from:
                state = state.replace(params=load_pretrained_params(
                    config.init_from, state.params, shapes.params, params_sharding))
            if teacher is not None:  # A student made of teacher layers starts from them.
                state = state.replace(params=teacher.init_student(state.params, params_sharding))
    start_step = int(state.step)
    best = None
    if config.objective not in ("lm", "sft") and evaluator is not None:
        best = best_lib.BestExport(workdir / "best", *objectives.best_metric(config))

    # --- Train. -----------------------------------------------------------------------------
    evaluated = (resume.reconcile_metrics(workdir / "metrics.jsonl", start_step)
                 if jax.process_index() == 0 else set())
    log = MetricLog(workdir, total_steps=config.num_train_steps, start_step=start_step)
    head_flops = objective.head_flops(model_config, config, seq_len)  # What the step runs.
    flops_per_token = flops.flops_per_token(model_config, seq_len, head_flops)
    peak = flops.peak_flops(jax.devices()[0], config.peak_flops) * jax.device_count()
    preempted = install_sigterm_handler()
    pending, last_metrics, preempted_at = None, {}, None
    clock = Throughput(flops_per_token, peak)
    shapes = CompiledShapes()

    def evaluate(step: int, *, record: bool = True) -> None:
        with clock.paused():  # Evaluation time is not training time.
            eval_metrics = evaluator(state.params, step)
            if best is not None and record:
                best.update(step, eval_metrics, graphdef, state.params, config.data.tokenizer,
                            workdir / "eval")
        if record:  # Written after best/: a line means its evaluation is complete.
            log.write(step, eval_metrics)
        last_metrics.update(eval_metrics)

    def flush(pending) -> None:  # A step's metrics, fetched from the device.
        check_finite(pending[1], config.max_bad_steps, pending[0])
        clock.completed(pending[0], *pending[2])
        if pending[0] % config.log_every == 0 or pending[0] == config.num_train_steps:
            train_metrics = {k: float(v) for k, v in pending[1].items()}
            train_metrics.update(clock.rates(), **shapes.summary(), **privacy(pending[0]))
            log.write(pending[0], train_metrics)  # Train metrics only: eval lines are their own.
            last_metrics.update(train_metrics)

    with sharding.use_mesh(mesh, rules), log:  # The log is closed (and flushed) on errors too.
        if evaluator is not None and resume.evaluation_due(start_step, config):
            # A kill during the evaluation at the restored step left no line: run it now. A
            # finished run evaluates again (its summary), without a second line.
            missing = any_process_has(start_step not in evaluated and jax.process_index() == 0)
            if missing or start_step == config.num_train_steps:
                evaluate(start_step, record=missing)
        for step in range(start_step, config.num_train_steps):
            host_batch = next(train_iter)
            tokens = (task_packing.real_tokens(host_batch), slot_tokens(host_batch))
            batch = to_global(host_batch, batch_sharding)
            with shapes.first_call(host_batch, clock):  # Compiling is not training time.
                state, metrics = train_step(state, batch)
            # Fetch the previous step's metrics only now, while this step runs on the device.
            if pending is not None:
                flush(pending)
            pending = (step + 1, metrics, tokens)
            log.advance()
            checkpointer.check_for_errors()  # A failed background save stops the run at once.
            done = step + 1 == config.num_train_steps
            due = evaluator is not None and resume.evaluation_due(step + 1, config)
            if due or done or checkpointer.is_save_step(step + 1):
                # This step's line goes before its checkpoint: a resume from it keeps the line.
                flush(pending)
                pending = None
            checkpointer.save(step + 1, state, train_iter, config.to_dict(), force=done)
            if due:
                evaluate(step + 1)
            if stop_requested(preempted, step, config.preemption_check_every):
                if pending is not None:
                    flush(pending)
                    pending = None
                checkpointer.save(step + 1, state, train_iter, config.to_dict(), force=True)
                log.message(f"SIGTERM: saved a checkpoint at step {step + 1}; exiting")
                preempted_at = step + 1
                break
        if pending is not None:  # The last step's metrics.
            flush(pending)
    checkpointer.wait()
    checkpointer.check_for_errors()
    checkpointer.close()
    return {"state": state, "metrics": last_metrics, "tokenizer": tokenizer, "config": config,
            "model_config": model_config, "graphdef": graphdef, "mesh": mesh, "rules": rules,
            "best": None if best is None else best.record, "preempted_at": preempted_at}


class Throughput:
    """Training speed between logged steps, from completion times, with evaluation and
    compilation excluded (the clock starts when the first step completes).

    `tokens_per_s` and `mfu` count real tokens; `slot_tokens_per_s` and `slot_mfu` count every
    position the device computed, padding included (their ratio is the padding overhead)."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.start_step = self.start_time = self.last_step = None
        self.excluded, self.tokens, self.slots = 0.0, 0, 0

    def completed(self, step: int, tokens: int, slots: int) -> None:
        if self.start_step is None:  # This step's tokens ran before the clock started.
            self.start_step, self.start_time, self.excluded = step, time.perf_counter(), 0.0
            self.tokens = self.slots = 0
        else:
            self.tokens, self.slots = self.tokens + tokens, self.slots + slots
        self.last_step = step

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start_time - self.excluded
        steps, tokens, slots = self.last_step - self.start_step, self.tokens, self.slots
        self.start_step, self.start_time, self.excluded = self.last_step, time.perf_counter(), 0.0
        self.tokens = self.slots = 0
        if steps <= 0 or elapsed <= 0:
            return {}
        per_s = lambda n: n / elapsed
        return {"steps_per_s": per_s(steps), "tokens_per_s": per_s(tokens),
                "slot_tokens_per_s": per_s(slots),
                "mfu": per_s(tokens) * self.flops_per_token / self.peak,
                "slot_mfu": per_s(slots) * self.flops_per_token / self.peak}

    @contextlib.contextmanager
    def paused(self):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - begin


def slot_tokens(batch: dict[str, np.ndarray]) -> int:
    """Positions the model computes for this batch: rows × length, padding included."""
    ids = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    return int(np.size(ids))


class CompiledShapes:
    """The distinct batch shapes the train step met (each compiled once), and the seconds their
    first calls took (tracing and compiling, or reading the persistent compilation cache)."""

    def __init__(self):
        self.seen: set[tuple] = set()
        self.compile_s = 0.0

    @contextlib.contextmanager
    def first_call(self, batch: dict[str, np.ndarray], clock: Throughput):
        signature = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if signature in self.seen:
            yield
            return
        self.seen.add(signature)
        begin = time.perf_counter()
        with clock.paused():
            yield
        self.compile_s += time.perf_counter() - begin
        logging.info("train step compiled for batch shape %s (%d shape(s), %.1f s compiling)",
                     {k: np.shape(v) for k, v in batch.items()}, len(self.seen), self.compile_s)

    def summary(self) -> dict[str, float]:
        return {"compiled_shapes": float(len(self.seen)), "compile_s": self.compile_s}


def prepare_workdir(workdir: str | os.PathLike) -> epath.Path:
    """The run's directory, created; local paths are resolved, gs:// paths taken as they are."""
    if not workdir:
        raise ValueError("no --workdir given: name a directory for checkpoints and metrics")
    if paths.is_remote(workdir):
        return prepare_remote_workdir(paths.as_path(workdir))
    path = pathlib.Path(workdir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--workdir {path} exists and is not a directory")
    if not path.parent.exists():
        raise FileNotFoundError(
            f"--workdir {path}: its parent {path.parent} does not exist; create it first")
    path.mkdir(exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"--workdir {path} is not writable; choose another directory")
    return epath.Path(path)


def prepare_remote_workdir(path: epath.Path) -> epath.Path:
    """Object stores have no directories to create or permissions to read: writing and deleting
    a small object is the one cheap check that the bucket exists and these credentials may write
    there. (mkdir is avoided: gcsfs would create a missing bucket.)"""
    probe = path / f".write_check.{jax.process_index()}"
    try:
        probe.write_text("ok\n")
        probe.unlink(missing_ok=True)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"--workdir {path}: the bucket does not exist ({error}); create it first") from error
    except Exception as error:  # gcsfs reports a refusal (403) as a plain OSError.
        raise OSError(
            f"--workdir {path}: cannot write there ({type(error).__name__}: {error}); check the "
            "bucket name and that this machine's credentials may write to it") from error
    return path


def check_values(config: ml_collections.ConfigDict) -> None:
    """Values no run can use, caught before anything is built (else: a random model "finishes"
    after -5 steps, a negative learning rate climbs the loss)."""
    problems = []
    if config.num_train_steps < 1:
        problems.append(f"num_train_steps={config.num_train_steps} (must be at least 1)")
    if config.data.global_batch_size < 1:
        problems.append(f"data.global_batch_size={config.data.global_batch_size} (must be at least 1)")
    if not config.learning_rate >= 0:
        problems.append(f"learning_rate={config.learning_rate} (must be >= 0)")
    for name, least in (("log_every", 1), ("checkpoint_every", 1), ("grad_accum_steps", 1),
                        ("eval_every", 0)):
        if config.get(name) is not None and config[name] < least:
            problems.append(f"{name}={config[name]} (must be at least {least})")
    if problems:
        raise ValueError("bad config value(s): " + "; ".join(problems))


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The batch must split evenly over the data-parallel devices and the microbatches."""
    batch = config.data.global_batch_size
    data_parallel = sharding.batch_devices(mesh)
    per_step = data_parallel * config.grad_accum_steps
    if batch % per_step:
        raise ValueError(
            f"data.global_batch_size={batch} is not divisible by data-parallel size "
            f"{data_parallel} (mesh data×fsdp×expert) × grad_accum_steps {config.grad_accum_steps}; "
            f"use a multiple of {per_step}"
        )
    if config.model.position == "learned" and config.data.max_length > config.model.max_length:
        raise ValueError(
            f"data.max_length={config.data.max_length} exceeds the model's learned position "
            f"table (model.max_length={config.model.max_length})"
        )


def get_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """Loads `data.tokenizer` (local or gs://); trains and caches it first when
    `tokenizer_training` says how."""
    if paths.is_remote(config.data.tokenizer):  # E.g. the tokenizer/ of a gs:// `init_from`.
        return load_tokenizer(model_io.local_tokenizer_copy(config.data.tokenizer))
    path = pathlib.Path(config.data.tokenizer).expanduser()
    training = config.tokenizer_training
    if not path.exists() and training.files:
        from transformer.data.sentencepiece_tokenizer import train_sentencepiece

        if jax.process_index() == 0:
            logging.info("training a %d-piece SentencePiece tokenizer → %s",
                         training.vocab_size, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}")
            train_sentencepiece(
                [f for f in training.files.split(",") if f], model_prefix=tmp,
                vocab_size=training.vocab_size, model_type=training.model_type,
                max_sentences=training.max_sentences,
            )
            os.replace(f"{tmp}.model", path)  # Atomic: a crash never leaves half a tokenizer.
            os.remove(f"{tmp}.vocab")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tokenizer trained")
    tokenizer = load_tokenizer(path)
    if config.data.get("chat_template") and tokenizer.chat_template is None:
        from transformer.data import chat  # A template for a tokenizer that has none.

        tokenizer.chat_template = chat.template_from_file(config.data.chat_template, tokenizer)
        logging.info("chat template %s (the tokenizer has none)", config.data.chat_template)
    return tokenizer


def check_vocab(model_config: ModelConfig, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model_config.vocab_size}; set --config.model.vocab_size="
            f"{tokenizer.padded_vocab_size()}"
        )


def check_finite(metrics: dict[str, jax.Array], max_bad_steps: int, step: int) -> None:
    streak = int(metrics["bad_streak"])
    if streak:
        logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, "
                        "%d in total)", step, streak, int(metrics["skipped"]))
    if streak >= max_bad_steps:
        raise NonFiniteError(
            f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
            "stopping. Lower the learning rate, enable grad_clip_norm or z_loss, or inspect the "
            f"data; the last good checkpoint is kept (max_bad_steps={max_bad_steps})"
        )


def install_sigterm_handler() -> dict[str, bool]:
    """A preempted TPU VM gets SIGTERM: note it, save at the end of the step, exit cleanly."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def stop_requested(flag: dict[str, bool], step: int, every: int) -> bool:
    """All processes must agree to stop (each saves its part of the checkpoint). With several
    processes the flags are exchanged every `every` steps, not every step, to keep the device
    queue full."""
    if jax.process_count() == 1:
        return flag["stop"]
    return step % every == 0 and any_process_has(flag["stop"])


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `init_from` applied: the checkpoint's architecture (runtime fields
    kept) and, when data.tokenizer is "", the checkpoint's tokenizer."""
    if not config.init_from:
        return config
    from transformer import model_io

    config = ml_collections.ConfigDict(config.to_dict())
    saved = model_io.read_config(config.init_from).to_dict()
    runtime = {k: config.model[k] for k in model_io.RUNTIME_FIELDS}
    changed = [k for k, v in saved.items() if k not in runtime and config.model.get(k) != v]
    if changed:
        logging.info("init_from %s: its architecture replaces config.model (%s)",
                     config.init_from, ", ".join(changed))
    config.model = ml_collections.ConfigDict({**saved, **runtime})
    tokenizer_dir = paths.as_path(config.init_from) / model_io.TOKENIZER_DIR
    if not config.data.tokenizer and tokenizer_dir.is_dir():
        config.data.tokenizer = str(tokenizer_dir)
    return config


def load_pretrained_params(path: str, params: Any, shapes: Any, params_sharding: Any) -> Any:
    """Parameters only (for fine-tuning), from a model checkpoint directory. A task model (its
    tree has 'backbone' and 'head') takes the checkpoint as its backbone. What the checkpoint
    cannot hold keeps `params` (its fresh initialization): a task head, and LoRA adapters when
    the checkpoint is of the base model."""
    from transformer import model_io
    from transformer.models import lora

    task = isinstance(shapes, dict) and set(shapes) == {"backbone", "head"}
    saved = model_io.checkpoint_shapes(path)

    def fresh(p: tuple[str, ...]) -> bool:
        if task and p[0] == "head":
            return True
        return lora.is_adapter_path(p) and ".".join(p[1:] if task else p) not in saved

    wanted = trainable.split(shapes, fresh)[1]
    wanted_sharding = params_sharding and trainable.split(params_sharding, fresh)[1]
    if task:
        loaded = {"backbone": model_io.load_params(
            path, wanted["backbone"], wanted_sharding and wanted_sharding["backbone"])}
    else:
        loaded = model_io.load_params(path, wanted, wanted_sharding)
    return trainable.join(trainable.split(params, fresh)[0], loaded)
