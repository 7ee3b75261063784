"""The trainer's config: every field, with its meaning. Recipes in configs/ start from this."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from transformer import sharding
from transformer.data import pipeline
from transformer.models import get_preset


def base_config(preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Parameter init, dropout and data order.
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
    c.init_from = ""  # Model checkpoint directory to load parameters from (fresh optimizer).
    c.peak_flops = placeholder(float)  # Per-device peak FLOP/s for MFU (None = known/measured).

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
