"""GLUE fine-tuning, SST-2 first: a pretrained BERT (e.g. all-MiniLM-L6-v2) + a classifier on the
pooled [CLS] state.

    python -m transformer.convert import --hf_dir=$(python -c "from transformer.train.config \
        import minilm_dir; print(minilm_dir())") --output=/tmp/minilm
    python -m transformer.main --config=configs/glue.py:sst2 --workdir=/tmp/sst2 \
        --config.init_from=/tmp/minilm
    python -m transformer.evaluate --config=configs/glue.py:sst2 --checkpoint=/tmp/sst2/best

Variants (comma-separated): `sst2` (local TSVs in $TRANSFORMER_DATA/sst2/, the default),
`sst2_tfds` (the TFDS catalog `glue/sst2`, prepared beforehand: nothing is downloaded), `cola`,
`qnli`, `mnli` (GLUE TSVs under $GLUE_DIR/<TASK>/), `dp` (differentially private fine-tuning,
DP-SGD at ε = 8 with LoRA, e.g. `sst2,dp`), and `ci` (a tiny random model, a few steps, on the
repository's SST-2 sample).
"""

import os
import pathlib

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import epoch_schedule, finetune_config, tiny_finetune

GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", locations.dataset("glue")))
# GLUE task → (registered task, folder, eval file, epochs).
TASKS = {
    "sst2": ("sst2", "SST-2", "dev.tsv", 3),
    "cola": ("cola", "CoLA", "dev.tsv", 3),
    "qnli": ("qnli", "QNLI", "dev.tsv", 3),
    "mnli": ("mnli", "MNLI", "dev_matched.tsv", 3),
}
TRAIN_SIZES = {"sst2": 67349, "cola": 8551, "qnli": 104743, "mnli": 392702}


def get_config(arg: str = "sst2"):
    allowed = [*TASKS, *(f"{t}_tfds" for t in TASKS), "ci", "dp"]
    variants = parse_variants(arg, allowed, "glue") or ["sst2"]
    name = next((v for v in variants if v.removesuffix("_tfds") in TASKS), "sst2")
    glue = name.removesuffix("_tfds")
    task, folder, eval_file, epochs = TASKS[glue]
    c = finetune_config("classification", task)
    c.init_from = ""  # Our model checkpoint to fine-tune (python -m transformer.convert import).
    c.finetune.pooling = "pooler"  # BERT: tanh(dense([CLS])), then dropout and a linear layer.
    if name.endswith("_tfds"):
        c.data.dataset = f"glue/{glue}"  # TFDS catalog name; read from data_dir, never downloaded.
        c.data.eval_split = "validation"
    else:
        root = locations.dataset("sst2") if glue == "sst2" else GLUE_DIR / folder
        if "ci" in variants and glue == "sst2":
            root = locations.sample("sst2")
        c.data.local_format = "tsv"  # GLUE TSVs: a header row, quotes are literal text.
        c.data.local_files.train = str(root / "train.tsv")
        c.data.local_files.validation = str(root / eval_file)
    c.data.max_length = 128  # Tokens per example (pairs are truncated longest-first).
    c.data.global_batch_size = 32  # Examples per step.
    c.learning_rate = 5e-5  # Peak, after warmup; then linear decay to 0.
    # 10% warmup; evaluate twice an epoch and at the end.
    epoch_schedule(c, TRAIN_SIZES[glue], epochs, evals_per_epoch=2)
    if "dp" in variants:  # DP-SGD at ε = 8 (README "Private fine-tuning"): LoRA and the head.
        c.model.update(lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value"))
        c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
        c.dp.update(enabled=True, target_epsilon=8.0, clip_norm=1.0, microbatch_size=32)
        c.data.global_batch_size = 256  # The expected Poisson batch; large batches suit DP.
        c.learning_rate = 2e-3
        epoch_schedule(c, TRAIN_SIZES[glue], epochs, evals_per_epoch=2)
    if "ci" in variants:
        tiny_finetune(c)
    return c
