"""T5 pretraining by span corruption (15 % of the tokens dropped in spans of mean length 3, each
span one sentinel from the top of the vocabulary; inputs 512 / targets 114 tokens, packed).

    # A v5p-16 (8 chips; small and base), on C4 (prepared once with
    # tfds build c4/en --file_format=array_record --data_dir=gs://...), a T5 SentencePiece model:
    python -m transformer.main --config=configs/t5_pretrain.py:small --workdir=gs://bucket/t5 \
        --config.data.data_dir=gs://bucket/tfds --config.data.tokenizer=/path/spiece.model
    # Check that it fits the slice's HBM (any machine, with libtpu; docs/scaling.md):
    python -m transformer.aot --config=configs/t5_pretrain.py:base --topology=v5p-16
    # This laptop, on the bundled Shakespeare corpus:
    python -m transformer.main --config=configs/t5_pretrain.py:tiny --workdir=/tmp/t5-tiny
    # Tiny, a few steps (tests):
    python -m transformer.main --config=configs/t5_pretrain.py:ci --workdir=/tmp/t5-ci

Variants: tiny, small (T5 v1.1 small shape, 77M with the 32k vocabulary), base (v1.1 base, 248M),
ci. The T5 SentencePiece model has 32,000 pieces: the 100 sentinels are ids 32,027 ... 32,127 of
the 32,128-entry embedding, as in T5 (`<extra_id_0>` = 32,099 there; any unused top ids work).
"""

from configs.bundled_corpus import use_bundled_corpus
from configs.variants import parse as parse_variants
from transformer.data import seq2seq, span_corruption
from transformer.train.config import base_config

PRESETS = {"tiny": "t5-v1_1-tiny", "ci": "t5-v1_1-tiny", "small": "flan-t5-small",
           "base": "flan-t5-base"}


def get_config(arg: str = "small"):
    (variant,) = parse_variants(arg, PRESETS, "t5_pretrain") or ["small"]
    c = base_config(PRESETS[variant])
    c.objective = "span_corruption"
    c.span_corruption = span_corruption.default_config()  # Density 0.15, mean span 3.
    c.seq2seq = seq2seq.default_config()
    c.model.vocab_size = 32128  # 32,000 pieces + sentinels, a multiple of 128.
    c.model.dropout_rate = 0.0  # T5 pretraining: no dropout.
    c.model.dtype = "bfloat16"  # Compute; parameters and optimizer state stay float32.
    c.model.remat_policy = "dots"
    c.data.dataset = "c4/en:3.1.0"
    c.data.tokenizer = "spiece.model"  # Set on the command line.
    c.data.max_length = 512  # Encoder rows.
    c.seq2seq.max_target_length = 114  # Decoder rows: what 568-token chunks leave, as in T5.
    c.data.global_batch_size = 128  # 128 × 512 = 65k input tokens a step (T5: 2^16).
    c.mesh.update({"data": -1, "fsdp": 8, "tensor": 1})  # FSDP over a host's chips.
    c.num_train_steps = 524_288  # T5: 2^19 steps.
    c.learning_rate = 1e-2  # Inverse square root after warmup, as T5 (with AdamW here).
    c.schedule = "rsqrt"
    c.warmup_steps = 10_000
    c.weight_decay = 0.0
    c.adam_b2 = 0.999
    c.grad_clip_norm = 1.0
    c.z_loss = 1e-4
    c.eval_every = 5000
    c.eval_steps = 50
    c.checkpoint_every = 5000
    if variant in ("tiny", "ci"):  # One CPU host, the bundled corpus.
        use_bundled_corpus(c, vocab_size=4096, max_length=128)
        c.model.vocab_size = 4096 + 128  # The tokenizer's 4096 pieces, then the sentinels.
        c.model.update(dict(hidden_size=128, num_layers=2, num_heads=4, head_dim=32, mlp_dim=256,
                            max_length=256, dtype="float32", remat_policy="none"))
        c.seq2seq.max_target_length = 32
        c.num_train_steps, c.learning_rate, c.warmup_steps, c.z_loss = 300, 3e-3, 30, 0.0
        c.eval_every, c.eval_steps, c.checkpoint_every = 100, 8, 100
    if variant == "ci":
        c.model.update(dict(hidden_size=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64))
        c.data.global_batch_size = 8
        c.num_train_steps, c.warmup_steps = 4, 1
        c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 2, 4, 2, 4
    return c
