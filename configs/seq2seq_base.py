"""What the seq2seq recipes (translation.py, summarization.py) share: a small T5-style model
trained from scratch, its optimization, and the CPU-sized variant. Not a recipe itself."""

import ml_collections

from transformer.data import seq2seq
from transformer.train.config import base_config


def t5_from_scratch(**model: int) -> ml_collections.ConfigDict:
    """T5 v1.0 as published (relative positions, RMSNorm, ReLU, unscaled attention logits, tied
    output scaled by d^-1/2, T5's initialization), width 256, an 8000-piece vocabulary (padded
    to 8064), `model` overriding the shape; the objective 'seq2seq'."""
    c = base_config("t5-tiny")
    c.model.update({**dict(vocab_size=8064, hidden_size=256, num_layers=3, num_decoder_layers=3,
                           num_heads=4, head_dim=64, mlp_dim=1024, relative_buckets=32,
                           relative_max_distance=128, max_length=256, dropout_rate=0.1),
                    **model})
    c.objective = "seq2seq"
    c.seq2seq = seq2seq.default_config()
    c.tokenizer_training.vocab_size = 8000
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    c.num_train_steps = 6000
    c.learning_rate = 1e-3  # Inverse square root decay after warmup.
    c.warmup_steps = 500
    c.schedule = "rsqrt"
    c.weight_decay = 0.01
    c.adam_b2 = 0.98
    c.label_smoothing = 0.1
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 1  # For resuming; the best model by the eval metric is WORKDIR/best/.
    return c


def tiny(c: ml_collections.ConfigDict, tokenizer: str) -> ml_collections.ConfigDict:
    """The :ci variant: a 1+1-layer width-32 model, a 400-piece vocabulary, a few steps."""
    c.model.update(dict(vocab_size=512, hidden_size=32, num_layers=1, num_decoder_layers=1,
                        num_heads=2, head_dim=16, mlp_dim=64, dropout_rate=0.0,
                        relative_buckets=8, relative_max_distance=20))
    c.tokenizer_training.vocab_size = 400
    c.data.tokenizer = tokenizer
    c.data.global_batch_size = 8
    c.num_train_steps, c.warmup_steps, c.learning_rate = 6, 2, 3e-3
    c.log_every, c.eval_every, c.checkpoint_every = 2, 6, 6
    return c
