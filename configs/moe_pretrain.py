"""Mixture-of-experts pretraining (Mixtral-style: 8 experts, top-2, renormalized; a
load-balancing loss at 0.02 and a router z-loss at 0.001).

    # Mixtral-8x7B shape on a v5p-128 (64 chips) on C4: experts over 'expert' (8), everything
    # else FSDP over 8 × the expert devices' share of the batch, remat full, 8 microbatches:
    python -m transformer.main --config=configs/moe_pretrain.py:8x7b --workdir=gs://bucket/mixtral \
        --config.data.data_dir=gs://bucket/tfds --config.data.tokenizer=/path/tokenizer.model
    # Check that it fits the slice's HBM (any machine, with libtpu; docs/scaling.md):
    python -m transformer.aot --config=configs/moe_pretrain.py:8x7b --topology=v5p-128
    # The same with the explicit all-to-all expert dispatch (README, "Mixture of experts"):
    python -m transformer.aot --config=configs/moe_pretrain.py:8x7b --topology=v5p-128 \
        --config.model.moe_dispatch=all_to_all
    # This laptop, on the bundled Shakespeare corpus (4 experts of width 128, top-2):
    python -m transformer.main --config=configs/moe_pretrain.py:tiny --workdir=/tmp/moe-tiny

Variants: tiny, 8x7b (Mixtral-8x7B shape: 46.7B parameters, 12.9B active per token).
"""

import ml_collections

from configs import llama_pretrain
from transformer.models import get_preset

PRESETS = {"tiny": "mixtral-tiny", "8x7b": "mixtral-8x7b"}


def get_config(arg: str = "8x7b"):
    if arg not in PRESETS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(PRESETS)}")
    # Optimizer, schedule, data, evaluation and checkpoints as Llama pretraining (its 7b or tiny).
    c = llama_pretrain.get_config("tiny" if arg == "tiny" else "7b")
    vocab_size = c.model.vocab_size
    c.model = ml_collections.ConfigDict(get_preset(PRESETS[arg]).to_dict())
    c.model.dtype = "bfloat16"  # Compute; parameters, optimizer state and the router stay float32.
    c.model.remat_policy = "full"  # Recompute each layer in the backward pass: memory for batch.
    c.model.moe_impl = "dropless"  # Sorted tokens, grouped matmuls: no token dropped.
    c.model.moe_dispatch = "partitioner"  # Or 'all_to_all': the explicit exchange in shard_map.
    c.model.router_aux_loss_weight = 0.02  # Load balance (Mixtral's router_aux_loss_coef).
    c.model.router_z_loss_weight = 0.001  # Router z-loss (ST-MoE).
    c.data.max_length = 4096
    c.data.global_batch_size = 512  # 2M tokens a step.
    c.grad_accum_steps = 8  # 64 rows of 4096 tokens per microbatch: one per chip at a time.
    # The 8 experts of every layer over 'expert' (one per device group), the rest FSDP; the
    # batch splits over fsdp × expert.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "expert": 8, "tensor": 1})
    c.num_train_steps = 250_000

    if arg == "tiny":  # On one CPU host, on the bundled corpus (as llama_pretrain.py:tiny).
        c.model.update(dict(vocab_size=vocab_size, max_length=256, dtype="float32",
                            remat_policy="none", mlp_dim=128))
        c.data.max_length, c.data.global_batch_size, c.grad_accum_steps = 128, 16, 1
        c.mesh.update({"expert": 1})
        c.num_train_steps = 200
    return c
