"""JAX/Flax NNX Transformer language models: BERT-, GPT-2- and Llama-style, sharded over any mesh.

    import transformer
    tokenizer, model = transformer.from_pretrained("path/to/hf-or-our-checkpoint")
    outputs = model(**tokenizer("Hello, world!", return_tensors="jax"))
    outputs.last_hidden_state
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def from_pretrained(path: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, model) from a Hugging Face folder or one of our model checkpoints.

    Keyword arguments (`mesh`, `rules`, `dtype`) go to `transformer.pretrained.from_pretrained`.
    """
    from transformer.pretrained import from_pretrained as load

    return load(path, **kwargs)
