"""GPT-2 pretraining (causal LM, learned positions, tied head) on a TFDS corpus or local text.

    # A v5p-64 (32 chips; every variant), on C4 (prepare it once:
    # tfds build c4/en --file_format=array_record --data_dir=gs://...):
    python -m transformer.main --config=configs/gpt2_pretrain.py:small --workdir=gs://bucket/gpt2 \
        --config.data.data_dir=gs://bucket/tfds
    # Check that it fits the slice's HBM (any machine, with libtpu; docs/scaling.md), for any
    # of small/medium/large/xl:
    python -m transformer.aot --config=configs/gpt2_pretrain.py:small --topology=v5p-64
    # This laptop, on the bundled Shakespeare corpus:
    python -m transformer.main --config=configs/gpt2_pretrain.py:tiny --workdir=/tmp/gpt2-tiny

Variants: tiny, small (124M), medium (355M), large (774M), xl (1.5B). Set `data.tokenizer` to the
GPT-2 BPE files (a folder with encoder.json + vocab.bpe, or a tokenizer.json, e.g. from a Hugging
Face `gpt2` folder). The tiny variant trains its own SentencePiece tokenizer on the bundled corpus.
"""

from configs.bundled_corpus import use_bundled_corpus
from transformer.train.config import base_config

PRESETS = {"tiny": "gpt2-tiny", "small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large",
           "xl": "gpt2-xl"}


def get_config(arg: str = "small"):
    if arg not in PRESETS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(PRESETS)}")
    c = base_config(PRESETS[arg])
    c.model.vocab_size = 50304  # 50257 BPE tokens padded to a multiple of 128 for the MXU.
    c.model.dtype = "bfloat16"  # Compute; parameters and optimizer state stay float32.
    c.model.remat_policy = "dots"  # Keep matmul outputs, recompute the rest in the backward pass.
    c.data.dataset = "c4/en:3.1.0"  # TFDS catalog name (ArrayRecord, prepared offline).
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.tokenizer = "gpt2"  # Folder with encoder.json + vocab.bpe (set it on the command line).
    c.data.max_length = 1024
    c.data.global_batch_size = 512  # 0.5M tokens a step, as in the GPT-2 / nanoGPT recipes.
    c.data.objective = "causal"
    c.mesh.update({"data": -1, "fsdp": 8, "tensor": 1})  # FSDP within 8 chips, data across.
    # xl on v5p-64: 2 microbatches of 8 rows per chip (60 of 95 GiB; 16 rows need 105 GiB).
    c.grad_accum_steps = 2 if arg == "xl" else 1
    c.num_train_steps = 600_000 if arg in ("small", "medium") else 300_000
    c.learning_rate = {"small": 6e-4, "medium": 3e-4}.get(arg, 2e-4)
    c.warmup_steps = 2000
    c.weight_decay = 0.1
    c.eval_every = 2000
    c.eval_steps = 100
    c.checkpoint_every = 2000
    c.keep_period = 50_000

    if arg == "tiny":  # On one CPU host, on the bundled corpus.
        use_bundled_corpus(c)
        c.model.update(dict(hidden_size=128, num_layers=2, num_heads=4, mlp_dim=512, max_length=128,
                            dtype="float32", remat_policy="none"))
        c.num_train_steps, c.learning_rate, c.warmup_steps = 200, 1e-3, 20
        c.eval_every, c.eval_steps, c.checkpoint_every = 100, 8, 100
    return c
