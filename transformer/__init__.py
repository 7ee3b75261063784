"""JAX/Flax NNX Transformer language models: BERT-, GPT-2- and Llama-style, sharded over any mesh."""

__version__ = "0.1.0"
