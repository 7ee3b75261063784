"""Llama pretraining (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head).

    # A v5p-64 (32 chips) on C4, Llama-7B: FSDP over 8 × 4-way tensor parallelism, 8 microbatches:
    python -m transformer.main --config=configs/llama_pretrain.py:7b --workdir=gs://bucket/llama7b \
        --config.data.data_dir=gs://bucket/tfds --config.data.tokenizer=/path/tokenizer.model
    # Check that it fits the slice's HBM (any machine, with libtpu; docs/scaling.md); 1b: v5p-32.
    python -m transformer.aot --config=configs/llama_pretrain.py:7b --topology=v5p-64
    python -m transformer.aot --config=configs/llama_pretrain.py:1b --topology=v5p-32
    # This laptop, on the bundled Shakespeare corpus:
    python -m transformer.main --config=configs/llama_pretrain.py:tiny --workdir=/tmp/llama-tiny

Variants: tiny, 1b (Llama-3.2-1B shape), 7b (Llama-2-7B shape). `data.tokenizer` is a Llama-style
SentencePiece `tokenizer.model` or a `tokenizer.json`.
"""

from configs.bundled_corpus import use_bundled_corpus
from transformer.train.config import base_config

PRESETS = {"tiny": "llama-tiny", "1b": "llama-1b", "7b": "llama-7b"}


def get_config(arg: str = "7b"):
    if arg not in PRESETS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(PRESETS)}")
    c = base_config(PRESETS[arg])
    c.model.dtype = "bfloat16"  # Compute; parameters and optimizer state stay float32.
    c.model.remat_policy = "full"  # Recompute each layer in the backward pass: memory for batch.
    c.data.dataset = "c4/en:3.1.0"  # TFDS catalog name (ArrayRecord, prepared offline).
    c.data.tokenizer = "tokenizer.model"  # Set on the command line.
    c.data.max_length = 4096 if arg == "7b" else 2048
    c.data.global_batch_size = 1024 if arg == "7b" else 512  # 4M / 1M tokens a step.
    # 7b on v5p-64: 8 microbatches of 16 rows per chip (59 of 95 GiB; 32 rows need 114 GiB).
    c.grad_accum_steps = 8 if arg == "7b" else 1
    c.data.objective = "causal"
    c.data.add_eos = True
    # 7B: parameters sharded over fsdp, 4-way tensor parallel within a host; 1B: FSDP only
    # (1b on v5p-32: 32 rows per chip, one microbatch, 58 of 95 GiB).
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 4 if arg == "7b" else 1})
    c.num_train_steps = 500_000
    c.learning_rate = 3e-4
    c.warmup_steps = 2000
    c.end_lr_fraction = 0.1
    c.weight_decay = 0.1
    c.adam_b2 = 0.95
    c.grad_clip_norm = 1.0
    c.z_loss = 1e-4  # Keeps the softmax normalizer near 1 in bfloat16.
    c.eval_every = 2000
    c.eval_steps = 50
    c.checkpoint_every = 1000
    c.keep_period = 20_000

    if arg == "tiny":  # On one CPU host, on the bundled corpus.
        use_bundled_corpus(c)
        c.model.update(dict(max_length=256, dtype="float32", remat_policy="none"))
        c.num_train_steps, c.learning_rate, c.warmup_steps, c.z_loss = 200, 1e-3, 20, 0.0
        c.eval_every, c.eval_steps, c.checkpoint_every = 100, 8, 100
    return c
