"""Generate text from a prompt with a decoder checkpoint, printing it as it is generated.

  python -m transformer.generate --checkpoint=path/to/model --prompt="Once upon a time" \
      --max_new_tokens=64 --temperature=0.8 --top_p=0.95

--checkpoint is our checkpoint directory or a local Hugging Face folder. Greedy by default
(--temperature=0); generation stops at the tokenizer's end-of-sequence token unless --stop_ids says
otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax

from transformer.inference.decode import stream
from transformer.inference.sampling import SamplingConfig


def stream_text(
    tokenizer: Any, model: Any, prompt: str, config: SamplingConfig, *, seed: int = 0,
    out: TextIO = sys.stdout,
) -> str:
    """Writes the continuation of `prompt` to `out` as tokens arrive; returns it."""
    prompt_ids = tokenizer(prompt, padding=False)["input_ids"]
    ids: list[int] = []
    shown = ""
    for token in stream(model, prompt_ids, config, rng=jax.random.key(seed)):
        if token in config.stop_tokens:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        # A token may end inside a multi-byte character: wait until the character is complete.
        if text.startswith(shown) and not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(ids)
    if text.startswith(shown):
        out.write(text[len(shown):])
    out.write("\n")
    return text


def sampling_config(tokenizer: Any, *, max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float, stop_ids: Sequence[int] | None) -> SamplingConfig:
    if stop_ids is None:
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop_tokens=tuple(int(i) for i in stop_ids), pad_id=pad)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from transformer.locations import enable_compilation_cache
    from transformer.pretrained import from_pretrained

    FLAGS = flags.FLAGS
    del argv
    enable_compilation_cache()
    tokenizer, model = from_pretrained(FLAGS.checkpoint, quantize=FLAGS.quantize)
    if tokenizer is None:
        raise SystemExit(f"{FLAGS.checkpoint} has no tokenizer files; generation needs them")
    stop = None if FLAGS.stop_ids is None else [int(i) for i in FLAGS.stop_ids]
    config = sampling_config(tokenizer, max_new_tokens=FLAGS.max_new_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                             stop_ids=stop)
    sys.stdout.write(FLAGS.prompt)
    stream_text(tokenizer, model, FLAGS.prompt, config, seed=FLAGS.seed)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "our checkpoint directory or a Hugging Face folder")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "weight-only quantization of the loaded model (transformer.quantize)")
    flags.DEFINE_string("prompt", None, "the text to continue")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise sample from softmax(logits / T)")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
    flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1 = all)")
    flags.DEFINE_integer("seed", 0, "random seed of the sampling")
    flags.DEFINE_list("stop_ids", None, "token ids that end generation (default: the tokenizer's EOS)")
    flags.mark_flags_as_required(["checkpoint", "prompt"])
    app.run(main)
