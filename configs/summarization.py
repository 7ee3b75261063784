"""Summarization: Debian package descriptions → their one-line synopses, ROUGE-1/2/L/Lsum (with
stemming) of greedy summaries of the test split; or fine-tuning an imported T5/BART checkpoint on
any local seq2seq file.

    # A small T5-style model from scratch, its SentencePiece vocabulary trained on the training
    # descriptions and synopses at first run:
    python -m transformer.main --config=configs/summarization.py --workdir=/tmp/debian
    # Fine-tune an imported checkpoint (T5, flan-T5 or BART; its tokenizer comes with it):
    python -m transformer.convert import --hf_dir=/path/flan-t5-small --output=/tmp/flan-t5-small
    python -m transformer.main --config=configs/summarization.py:finetune --workdir=/tmp/debian-ft \
        --config.init_from=/tmp/flan-t5-small
    # ... on any JSONL/CSV/TSV file with source and target columns:
    python -m transformer.main --config=configs/summarization.py:finetune --workdir=/tmp/ft \
        --config.init_from=/tmp/flan-t5-small --config.data.local_format=csv \
        --config.data.local_files.train=train.csv --config.data.local_files.test=test.csv \
        --config.seq2seq.source_key=article --config.seq2seq.target_key=highlights
    # Tiny, a few steps, on the repository's Debian sample:
    python -m transformer.main --config=configs/summarization.py:ci --workdir=/tmp/sum-ci

The data are `$TRANSFORMER_DATA/summarization/debian/{train,validation,test}.jsonl.gz` (keys
`document`, `summary`). Variants: `debian` (the default), `finetune`, `ci`.
"""

from configs.seq2seq_base import t5_from_scratch, tiny
from configs.variants import parse as parse_variants
from transformer import locations


def get_config(arg: str = "debian"):
    variants = parse_variants(arg, ["debian", "finetune", "ci"], "summarization")
    ci, finetune = "ci" in variants, "finetune" in variants
    c = t5_from_scratch(num_layers=4, num_decoder_layers=2)  # 4 + 2 layers: 7.3M parameters.
    c.seq2seq.source_key, c.seq2seq.target_key = "document", "summary"
    c.seq2seq.max_target_length = 32  # Synopses: median ~7 words.
    c.seq2seq.metrics = "rouge"  # ROUGE-1/2/L/Lsum F-measure, Porter stemming.
    root = locations.sample("debian") if ci else locations.dataset("summarization", "debian")
    suffix = ".jsonl" if ci else ".jsonl.gz"
    c.data.local_format = "jsonl"
    for split in ("train", "validation", "test"):
        c.data.local_files[split] = str(root / f"{split}{suffix}")
    c.data.eval_split = "test"  # All 1,399 test examples.
    c.data.max_length = 192  # Description tokens kept (longer ones are cut, counted and logged).
    c.data.global_batch_size = 32
    c.tokenizer_training.files = str(root / f"train{suffix}")  # JSON lines: text enough for it.
    c.data.tokenizer = str(locations.cache_dir("tokenizers") / "debian_sp8000.model")
    c.finetune.best_metric = "eval_rougeL"
    if finetune:  # An imported T5/BART: its architecture and tokenizer/ replace the above.
        c.init_from = ""  # Set on the command line.
        c.data.tokenizer = ""
        c.tokenizer_training.files = ""
        c.seq2seq.source_prefix = "summarize: "  # T5's task prefix (harmless for BART).
        c.learning_rate, c.schedule, c.warmup_steps = 3e-4, "linear", 200
        c.end_lr_fraction = 0.0
        c.num_train_steps = 3000
        c.label_smoothing = 0.0
    if ci:
        tiny(c, str(locations.cache_dir("tokenizers") / "debian_ci_sp400.model"))
        c.data.max_length, c.seq2seq.max_target_length = 64, 16
    return c
