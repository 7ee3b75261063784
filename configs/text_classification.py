"""Text classification of any local CSV/TSV/JSONL file with a text column (or two, for pairs)
and a label column. The label set is read from the training split (or listed in
finetune.labels); a label found only in the evaluation file stops the run naming file and line.

    python -m transformer.convert import --hf_dir=$(python -c "from transformer.train.config \
        import minilm_dir; print(minilm_dir())") --output=/tmp/minilm
    python -m transformer.main --config=configs/text_classification.py --workdir=/tmp/tc \
        --config.init_from=/tmp/minilm --config.data.local_format=csv \
        --config.data.local_files.train=reviews_train.csv \
        --config.data.local_files.validation=reviews_dev.csv \
        --config.finetune.text_keys=review --config.finetune.label_key=stars
    python -m transformer.evaluate --config=configs/text_classification.py \
        --checkpoint=/tmp/tc/best --config.data.local_files.validation=reviews_dev.csv ...

By default it reads the SST-2 TSVs in $TRANSFORMER_DATA/sst2/ as a generic file. Variants: `base`,
`ci` (a tiny random model on the repository's SST-2 sample).
"""

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import finetune_config, tiny_finetune


def get_config(arg: str = "base"):
    variants = parse_variants(arg, ["base", "ci"], "text_classification")
    c = finetune_config("classification", "text_classification")  # Not registered: defined here.
    c.init_from = ""  # Our model checkpoint to fine-tune (python -m transformer.convert import).
    c.data.local_format = "tsv"  # csv, tsv (a header row names the columns) or jsonl.
    root = locations.sample("sst2") if "ci" in variants else locations.dataset("sst2")
    c.data.local_files.train = str(root / "train.tsv")
    c.data.local_files.validation = str(root / "dev.tsv")
    c.finetune.text_keys = "sentence"  # The text column; two (comma-separated) for pairs.
    c.finetune.label_key = "label"  # The label column.
    c.finetune.labels = ""  # "" = the sorted distinct labels of the training split.
    c.finetune.pooling = "pooler"  # 'pooler' (BERT), 'cls', 'mean', or 'last' (decoders).
    c.data.max_length = 128  # Tokens per example.
    c.data.global_batch_size = 32  # Examples per step.
    c.learning_rate = 5e-5  # Peak, after warmup; then linear decay to 0.
    c.num_train_steps = 4000  # Optimizer steps.
    c.warmup_steps = 400  # 10% warmup.
    c.eval_every = 1000  # And at the end.
    c.checkpoint_every = 1000
    if "ci" in variants:
        tiny_finetune(c)
    return c
