"""BERT pretraining: masked LM (15% of tokens; 80% [MASK], 10% random, 10% kept), post-LN encoder.

    # A TPU slice (base: v5litepod-8, large: v5litepod-16), on English Wikipedia
    # (tfds build wikipedia/20230601.en --file_format=array_record):
    python -m transformer.main --config=configs/bert_pretrain.py:base --workdir=gs://bucket/bert \
        --config.data.data_dir=gs://bucket/tfds --config.data.tokenizer=/path/vocab.txt
    # Check that it fits that slice's HBM (any machine, with libtpu; docs/scaling.md):
    python -m transformer.aot --config=configs/bert_pretrain.py:base --topology=v5litepod-8
    python -m transformer.aot --config=configs/bert_pretrain.py:large --topology=v5litepod-16
    # This laptop, on the bundled Shakespeare corpus:
    python -m transformer.main --config=configs/bert_pretrain.py:tiny --workdir=/tmp/bert-tiny

Variants: tiny, base (110M), large (335M). `data.tokenizer` is a WordPiece `vocab.txt` or a
`tokenizer.json`; the tiny variant trains a SentencePiece tokenizer with [CLS]/[SEP]/[MASK].
No next-sentence prediction (RoBERTa showed it does not help); documents are packed.
"""

from configs.bundled_corpus import use_bundled_corpus
from transformer.train.config import base_config

PRESETS = {"tiny": "bert-tiny", "base": "bert-base", "large": "bert-large"}


def get_config(arg: str = "base"):
    if arg not in PRESETS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(PRESETS)}")
    c = base_config(PRESETS[arg])
    c.model.dtype = "bfloat16"
    c.model.vocab_size = 30592  # 30522 WordPiece tokens padded to a multiple of 128.
    c.data.dataset = "wikipedia/20230601.en"
    c.data.tokenizer = "vocab.txt"  # Set on the command line.
    c.data.objective = "mlm"
    c.data.mlm_probability = 0.15
    c.data.whole_word_masking = True
    c.data.max_length = 512
    c.data.global_batch_size = 256 if arg == "base" else 512
    # base on v5litepod-8: data parallel, 2 microbatches of 16 rows per chip (13.7 of 16 GiB).
    c.mesh.update({"data": -1, "fsdp": 1, "tensor": 1})
    c.grad_accum_steps = 2
    if arg == "large":  # v5litepod-16: the state sharded (FSDP), 8 microbatches of 4 rows (7.3 GiB).
        c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
        c.grad_accum_steps = 8
    c.num_train_steps = 1_000_000
    c.learning_rate = 1e-4
    c.warmup_steps = 10_000
    c.schedule = "linear"
    c.end_lr_fraction = 0.0
    c.weight_decay = 0.01
    c.adam_b2 = 0.999
    c.adam_eps = 1e-6
    c.eval_every = 5000
    c.eval_steps = 100
    c.checkpoint_every = 5000

    if arg == "tiny":  # On one CPU host, on the bundled corpus.
        use_bundled_corpus(c)
        c.model.update(dict(max_length=128, dtype="float32", dropout_rate=0.0,
                            attention_dropout_rate=0.0))
        c.data.whole_word_masking = False
        c.grad_accum_steps = 1
        c.num_train_steps, c.learning_rate, c.warmup_steps = 200, 1e-3, 20
        c.eval_every, c.eval_steps, c.checkpoint_every = 100, 8, 100
    return c
