"""Using a trained model: features and sentence embeddings, generation, scoring."""

from transformer.inference.beam import BeamConfig, BeamGeneration, beam_generate
from transformer.inference.decode import Generation, generate, left_pad, stream
from transformer.inference.features import (
    Pooling,
    mean_pool,
    pool,
    read_pooling,
    sentence_embeddings,
)
from transformer.inference.sampling import SamplingConfig, sample, top_k_mask, top_p_mask
from transformer.inference.scoring import (
    TextScore,
    next_token_logprobs,
    perplexity,
    score_texts,
    token_logprobs,
)
from transformer.inference.seq2seq import seq2seq_beam_generate, seq2seq_generate

__all__ = [
    "BeamConfig", "BeamGeneration", "Generation", "Pooling", "SamplingConfig", "TextScore",
    "beam_generate", "generate", "left_pad", "mean_pool", "next_token_logprobs", "perplexity",
    "pool", "read_pooling", "sample", "score_texts", "sentence_embeddings", "seq2seq_beam_generate",
    "seq2seq_generate", "stream",
    "token_logprobs", "top_k_mask", "top_p_mask",
]
