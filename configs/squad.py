"""Extractive question answering (SQuAD v1.1 JSON): a pretrained BERT + start/end logits over
question-context windows (doc stride as Hugging Face), answers decoded from the best span of
every window, scored with the official EM/F1.

    python -m transformer.convert import --hf_dir=$(python -c "from transformer.train.config \
        import minilm_dir; print(minilm_dir())") --output=/tmp/minilm
    python -m transformer.main --config=configs/squad.py --workdir=/tmp/squad \
        --config.init_from=/tmp/minilm
    python -m transformer.evaluate --config=configs/squad.py --checkpoint=/tmp/squad/best

Questions whose answer does not occur at its offset in the context are skipped, counted, and
reported in the log and in the evaluation metrics (eval_count_bad_squad_question); set
data.on_error=raise to stop at the first one instead. Variants: `squad`
(default: $TRANSFORMER_DATA/squad/), `ci` (a tiny random model on the repository's SQuAD sample),
`dp` (DP-SGD at ε = 8 with LoRA, a question's windows clipped together; README "Private
fine-tuning"; e.g. `ci,dp`).
"""

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import epoch_schedule, finetune_config, tiny_finetune


def get_config(arg: str = "squad"):
    variants = parse_variants(arg, ["squad", "ci", "dp"], "squad")
    c = finetune_config("qa", "squad")
    c.init_from = ""  # Our model checkpoint to fine-tune (python -m transformer.convert import).
    c.data.local_format = "squad"  # SQuAD v1.1 JSON (gzip or plain).
    c.data.local_files.train = str(locations.dataset("squad", "train-v1.1.reconstructed.json.gz"))
    c.data.local_files.validation = str(locations.dataset("squad", "dev-v1.1.json.gz"))
    c.data.on_error = "skip"  # Bad questions: skipped and counted, not fatal.
    c.data.max_length = 384  # Tokens per window: [CLS] question [SEP] context part [SEP].
    c.data.doc_stride = 128  # Context tokens shared by consecutive windows.
    c.data.max_query_length = 64  # Question tokens kept.
    c.data.global_batch_size = 32  # Windows per step.
    c.finetune.n_best_size = 20  # Start/end candidates per window.
    c.finetune.max_answer_length = 30  # Longest answer, in tokens.
    c.learning_rate = 5e-5  # Peak, after warmup; then linear decay to 0.
    # ~88.6k windows of 87.6k questions; 10% warmup; evaluate every epoch and at the end.
    epoch_schedule(c, 88_600, epochs=2)
    if "dp" in variants:  # DP-SGD at ε = 8: LoRA and the head train; a question is the unit.
        c.model.update(lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value"))
        c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
        c.dp.update(enabled=True, target_epsilon=8.0, clip_norm=1.0, microbatch_size=32,
                    windows_per_example=4)  # More windows in a question: an error, with the fix.
        c.data.global_batch_size = 256  # The expected Poisson batch (questions a step).
        c.learning_rate = 2e-3
        epoch_schedule(c, 87_599, epochs=2)
    if "ci" in variants:
        tiny_finetune(c)
        c.data.max_length = 128
        c.data.doc_stride = 32
        c.data.max_query_length = 32
        c.data.local_files.train = str(locations.sample("squad", "train-v1.1.json"))
        c.data.local_files.validation = str(locations.sample("squad", "dev-v1.1.json"))
        if "dp" in variants:
            c.dp.update(expected_batch_size=4, microbatch_size=8)  # 8: the CPU test devices.
    return c
