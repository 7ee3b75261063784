"""Long-context Llama pretraining: the sequence split over a 'context' mesh axis (ring attention,
causal load balancing; transformer/models/context_parallel.py).

    # Llama-7B at 32k tokens a sequence on a v5p-64 (32 chips): context 8 × fsdp 4:
    python -m transformer.main --config=configs/long_context.py:32k --workdir=gs://bucket/llama7b-32k \
        --config.data.data_dir=gs://bucket/tfds --config.data.tokenizer=/path/tokenizer.model
    # Check that it fits (any machine, with libtpu; docs/scaling.md); 128k: v5p-256:
    python -m transformer.aot --config=configs/long_context.py:32k --topology=v5p-64
    python -m transformer.aot --config=configs/long_context.py:128k --topology=v5p-256
    # The other strategy, all keys and values gathered on every device:
    python -m transformer.aot --config=configs/long_context.py:32k --topology=v5p-64 \
        --config.model.context_parallel=all_gather
    # This laptop, the bundled corpus, the sequence split over 4 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m transformer.main \
        --config=configs/long_context.py:tiny --workdir=/tmp/long-tiny

Variants: tiny, 32k, 128k (Llama-2-7B shape; RoPE base raised to 500k for long context, as
Llama-3 does; `--config.model.rope_scaling=llama3` extends a model trained shorter instead).
"""

import ml_collections

from configs import llama_pretrain

LENGTHS = {"tiny": 256, "32k": 32768, "128k": 131072}


def get_config(arg: str = "32k"):
    if arg not in LENGTHS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(LENGTHS)}")
    # Optimizer, schedule, data, evaluation and checkpoints as Llama pretraining (its 7b or tiny).
    c = llama_pretrain.get_config("tiny" if arg == "tiny" else "7b")
    length = LENGTHS[arg]
    c.data.max_length = length
    c.model.max_length = length
    c.model.rope_base = 500_000.0  # Wavelengths up to the context length.
    c.model.context_parallel = "ring"  # Key/value blocks around the context devices.
    c.model.context_load_balance = True  # Zig-zag chunks: equal causal work on every device.
    # 4M tokens a step: 128 rows of 32k, 32 of 128k.
    c.data.global_batch_size = 4 * 1024 * 1024 // length
    if arg == "32k":  # v5p-64: 32k / 8 = 4k tokens per chip and row; 4 rows per chip at a
        # time (8 microbatches): 38 of 95 GiB (docs/scaling.md).
        c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 4, "context": 8, "tensor": 1})
        c.grad_accum_steps = 8
    elif arg == "128k":  # v5p-256 (128 chips): 128k / 16 = 8k tokens per chip and row, one
        # row per chip at a time.
        c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 8, "context": 16, "tensor": 1})
        c.grad_accum_steps = 4
    else:  # On one CPU host (as llama_pretrain.py:tiny), the rest of the devices on 'context'.
        c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "context": -1, "tensor": 1})
        c.data.global_batch_size = 8
        c.model.dtype = "float32"
    return c
