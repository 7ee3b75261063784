"""Score texts with a decoder checkpoint: per-token log-probabilities, log-likelihood, perplexity.

  python -m transformer.score --checkpoint=path/to/model --text="The cat sat on the mat."
  python -m transformer.score --checkpoint=path/to/model --file=texts.txt   # one text a line

Prints one line per text (log-likelihood, scored tokens, perplexity), each token's log-probability
with --per_token, and the perplexity over all texts.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from transformer.inference.scoring import TextScore, score_texts


def report(tokenizer: Any, scores: Sequence[TextScore], *, per_token: bool = False,
           out: TextIO = sys.stdout) -> float:
    """Writes the scores; returns the perplexity over all scored tokens."""
    for s in scores:
        out.write(f"log_likelihood={s.log_likelihood:.4f}\ttokens={s.num_scored}\t"
                  f"perplexity={s.perplexity:.4f}\t{s.text}\n")
        if per_token:
            for token, lp in zip(s.tokens[1:], s.logprobs):
                out.write(f"\t{lp:9.4f}\t{tokenizer.id_to_token(token)!r}\n")
    total = sum(s.num_scored for s in scores)
    ppl = math.exp(-sum(s.log_likelihood for s in scores) / total) if total else float("nan")
    out.write(f"all texts: tokens={total}\tperplexity={ppl:.4f}\n")
    return ppl


def read_texts(texts: Sequence[str] | None, file: str | None) -> list[str]:
    out = list(texts or [])
    if file:
        lines = pathlib.Path(file).read_text(encoding="utf-8").splitlines()
        out += [line for line in lines if line.strip()]
    if not out:
        raise ValueError("nothing to score: give --text or --file")
    if empty := [i for i, text in enumerate(out, start=1) if not text.strip()]:
        raise ValueError(f"text {empty[0]} is empty: an empty text has no tokens to score; "
                         "drop it or give it some text")
    return out


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from transformer.locations import enable_compilation_cache
    from transformer.pretrained import from_pretrained

    FLAGS = flags.FLAGS
    del argv
    enable_compilation_cache()
    tokenizer, model = from_pretrained(FLAGS.checkpoint, quantize=FLAGS.quantize)
    if tokenizer is None:
        raise FileNotFoundError(f"{FLAGS.checkpoint} has no tokenizer files; scoring text needs "
                                "them (export the model with its tokenizer)")
    texts = read_texts(FLAGS.text, FLAGS.file)
    report(tokenizer, score_texts(tokenizer, model, texts, batch_size=FLAGS.batch_size),
           per_token=FLAGS.per_token)


if __name__ == "__main__":
    from absl import flags

    from transformer import cli

    flags.DEFINE_string("checkpoint", None, "our checkpoint directory or a Hugging Face folder")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "weight-only quantization of the loaded model (transformer.quantize)")
    flags.DEFINE_multi_string("text", None, "a text to score (repeatable)")
    flags.DEFINE_string("file", None, "a file of texts to score, one a line")
    flags.DEFINE_integer("batch_size", 8, "texts per forward pass")
    flags.DEFINE_bool("per_token", False, "also print each token's log-probability")
    flags.mark_flag_as_required("checkpoint")
    cli.run(main)
