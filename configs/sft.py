"""Supervised instruction tuning of a decoder with LoRA: SQuAD questions as chat conversations,
the loss on the assistant's answers only, only the adapters trained.

    # A base model: the Llama :tiny pretrained on the bundled corpus (or any decoder checkpoint,
    # e.g. a Hugging Face folder imported with python -m transformer.convert import).
    python -m transformer.main --config=configs/llama_pretrain.py:tiny --workdir=/tmp/llama-tiny
    python -m transformer.main --config=configs/sft.py --workdir=/tmp/sft \
        --config.init_from=/tmp/llama-tiny/model
    # The answers before tuning: the same run with the adapters left at zero (B = 0).
    python -m transformer.main --config=configs/sft.py --workdir=/tmp/sft-before \
        --config.init_from=/tmp/llama-tiny/model --config.learning_rate=0 \
        --config.num_train_steps=1
    python -m transformer.generate --checkpoint=/tmp/sft/model --chat \
        --prompt="Context: The castle was built in 1320. Question: When was the castle built?"

The run writes WORKDIR/model (our checkpoint, adapters included), WORKDIR/adapter (a Hugging Face
peft folder: `PeftModel.from_pretrained(base, WORKDIR/adapter)`) and WORKDIR/merged (the adapters
folded into the weights). A tokenizer without a chat template gets `data.chat_template` ('plain':
User:/Assistant: turns ended by its own eos token; 'inst': [INST] turns). Variants: default
(SQuAD v1.1 under $TRANSFORMER_DATA/squad/, 8,000 training questions, 500 held-out), `ci` (a
tiny random Llama on the repository's SQuAD sample, a few steps), `dp` (DP-SGD at ε = 8, one
conversation a privacy unit and a row; README "Private fine-tuning"; e.g. `ci,dp`).
"""

from configs.variants import parse as parse_variants
from transformer import locations
from transformer.train.config import base_config


def get_config(arg: str = "squad"):
    variants = parse_variants(arg, ["squad", "ci", "dp"], "sft")
    c = base_config("llama-tiny")
    c.objective = "sft"
    c.init_from = ""  # The decoder checkpoint to adapt (its tokenizer/ is used).
    c.data.tokenizer = ""  # "" = the tokenizer/ of init_from.
    c.data.chat_template = "plain"  # For a tokenizer without its own template (chat_templates/).
    c.data.local_format = "squad"  # SQuAD questions → conversations (or 'jsonl' conversations).
    c.data.local_files.train = str(locations.dataset("squad", "train-v1.1.reconstructed.json.gz"))
    c.data.local_files.validation = str(locations.dataset("squad", "dev-v1.1.json.gz"))
    c.data.sft_max_examples = 8000  # The first training questions ...
    c.data.sft_max_eval_examples = 500  # ... and held-out (dev) questions.
    c.data.on_error = "skip"  # Questions whose answer is not at its offset: counted, skipped.
    c.data.max_length = 256  # Tokens per packed row; longer conversations are truncated.
    c.data.global_batch_size = 16  # Rows a step.
    # LoRA on every linear layer of the blocks; the base stays frozen.
    c.model.update(dict(lora_rank=16, lora_alpha=32.0, lora_targets=("all-linear",),
                        lora_dropout=0.05, dropout_rate=0.0, attention_dropout_rate=0.0))
    c.finetune.train_also = ""  # Nothing but the adapters.
    c.learning_rate = 2e-3  # LoRA takes larger steps than full fine-tuning.
    c.warmup_steps = 30
    c.schedule = "cosine"
    c.end_lr_fraction = 0.1
    c.weight_decay = 0.0
    c.num_train_steps = 300
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 100
    c.keep_checkpoints = 1
    if "dp" in variants:  # DP-SGD: LoRA only (the documented way to keep the noise small).
        c.dp.update(enabled=True, target_epsilon=8.0, clip_norm=1.0, microbatch_size=16)
        c.data.global_batch_size = 64  # The expected Poisson batch (conversations a step).
    if "ci" in variants:
        c.model.update(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                            max_length=128, vocab_size=32000, lora_rank=4))
        c.data.tokenizer = str(locations.sample("tokenizers", "mistral_sp32000.model"))
        c.data.local_files.train = str(locations.sample("squad", "train-v1.1.json"))
        c.data.local_files.validation = str(locations.sample("squad", "dev-v1.1.json"))
        c.data.sft_max_examples, c.data.sft_max_eval_examples = 40, 60
        c.data.max_length = 128
        c.data.global_batch_size = 8
        c.num_train_steps, c.warmup_steps = 6, 2
        c.log_every, c.eval_every, c.checkpoint_every = 2, 3, 3
        if "dp" in variants:
            c.dp.update(expected_batch_size=4, microbatch_size=8)  # 8: the CPU test devices.
    return c
