"""The embedded demo: a small GPT trained on Shakespeare on a laptop CPU in about two minutes
(125 s cold on 2 cores).

    python -m transformer.main --config=configs/demo.py --workdir=/tmp/demo

No download: the corpus ships in data/shakespeare/; a 4,096-piece SentencePiece tokenizer is
trained on it at first run and cached in ~/.cache/transformer/ ($TRANSFORMER_CACHE), as is the
prepared dataset and the compiled programs. At the end the run prints generated samples.
Rerunning the command resumes from the last checkpoint (and, once finished, only evaluates and
samples again).
"""

from configs import variants
from configs.bundled_corpus import use_bundled_corpus
from transformer.train.config import base_config


def get_config(arg: str = ""):
    variants.parse(arg, ["ci"], "demo")
    c = base_config("gpt2-tiny")
    # A ~5M-parameter GPT: 4 pre-LN layers of width 256, RoPE-free learned positions.
    c.model.hidden_size = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.mlp_dim = 1024
    c.model.max_length = 128
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0

    use_bundled_corpus(c)
    c.data.objective = "causal"

    # 150 steps of 2,048 tokens: the held-out loss falls ~39% from ln(4096) in ~2.5 min on 2 cores.
    c.num_train_steps = 150
    c.learning_rate = 2e-3
    c.warmup_steps = 30
    c.weight_decay = 0.1
    c.log_every = 15
    c.eval_every = 75
    c.eval_steps = None  # The whole held-out split.
    c.checkpoint_every = 75

    c.samples.prompts = ("ROMEO.", "To be, or not to be", "KING HENRY.")
    c.samples.max_new_tokens = 48

    if arg == "ci":  # A few steps, for the test suite.
        c.num_train_steps = 8
        c.log_every = 2
        c.eval_every = 4
        c.eval_steps = 2
        c.checkpoint_every = 4
        c.samples.max_new_tokens = 8
    return c
