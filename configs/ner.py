"""Named-entity recognition (CoNLL format): a pretrained BERT + a linear layer on every token.
Each word is labelled at its first subword; later subwords and special tokens are not scored.
Scored with entity-level F1 (the seqeval/conlleval definition).

    python -m transformer.convert import --hf_dir=$(python -c "from transformer.train.config \
        import minilm_dir; print(minilm_dir())") --output=/tmp/minilm
    python -m transformer.main --config=configs/ner.py:conll2003 --workdir=/tmp/ner \
        --config.init_from=/tmp/minilm
    python -m transformer.evaluate --config=configs/ner.py:conll2003 --checkpoint=/tmp/ner/best \
        --split=test

Variants (comma-separated): `conll2003` (IOB2 files in $TRANSFORMER_DATA/ner/, the default),
`wnut17`, `custom` (your own CoNLL files and tag set: set data.local_files.* ; the tags are read
from the training split), and `ci` (a tiny random model, a few steps, on the
repository's WNUT-17 sample).
"""

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import epoch_schedule, finetune_config, tiny_finetune

NER = locations.dataset("ner")
SAMPLE = locations.sample("wnut17")
CORPORA = {  # task: (train, validation, test, training sentences)
    "conll2003": (NER / "conll2003" / "iob2" / "train.txt", NER / "conll2003" / "iob2" / "valid.txt",
                  NER / "conll2003" / "iob2" / "test.txt", 14041),
    "wnut17": (NER / "wnut17" / "wnut17train.conll", NER / "wnut17" / "emerging.dev.conll",
               NER / "wnut17" / "emerging.test.annotated", 3394),
}


def get_config(arg: str = "conll2003"):
    variants = parse_variants(arg, [*CORPORA, "ci", "custom"], "ner") or ["conll2003"]
    name = next((v for v in variants if v in CORPORA), "conll2003")
    if "ci" in variants:  # CoNLL-2003 may not be redistributed: the sample is WNUT-17's.
        name = "wnut17"
    task = "my_ner" if "custom" in variants else name  # A new name: tags from the train split.
    c = finetune_config("token_classification", task)
    c.init_from = ""  # Our model checkpoint to fine-tune (python -m transformer.convert import).
    train, validation, test, size = CORPORA[name]
    if "ci" in variants:
        train, validation, test = SAMPLE / "train.conll", SAMPLE / "dev.conll", SAMPLE / "test.conll"
    c.data.local_format = "conll"  # One token per line (token first, tag last), blank lines between.
    c.data.local_files.train = str(train)
    c.data.local_files.validation = str(validation)
    c.data.local_files.test = str(test)
    c.data.max_length = 128  # Subword tokens per sentence; longer ones are truncated (counted).
    c.data.global_batch_size = 32  # Sentences per step.
    c.learning_rate = 5e-5  # Peak, after warmup; then linear decay to 0.
    epoch_schedule(c, size, epochs=3)  # 10% warmup; evaluate every epoch and at the end.
    if "ci" in variants:
        tiny_finetune(c)
    return c
