"""Generate text from a prompt with a decoder checkpoint, printing it as it is generated.

  python -m transformer.generate --checkpoint=path/to/model --prompt="Once upon a time" \
      --max_new_tokens=64 --temperature=0.8 --top_p=0.95

--checkpoint is our checkpoint directory or a local Hugging Face folder. Greedy by default
(--temperature=0); generation stops at the tokenizer's end-of-sequence token unless --stop_ids says
otherwise.

Beam search (--num_beams > 1) keeps the most likely continuations instead of sampling one; it
prints the best --num_return_sequences of them, each with its score (transformers'
`sequences_scores`: summed log-probability / new tokens ** --length_penalty):

  python -m transformer.generate --checkpoint=path/to/model --prompt="Once upon a time" \
      --num_beams=4 --length_penalty=1.0 --early_stopping=true --num_return_sequences=2

An encoder-decoder (T5, BART, our own) maps --input to a new text instead of continuing a prompt;
greedy, sampling and beam search work as above:

  python -m transformer.generate --checkpoint=path/to/t5 --input="translate English to German: Hi" \
      --num_beams=4 --num_return_sequences=2

An instruct model answers best in the layout it was trained on: --chat sends --prompt as one user
message (after a --system message, if given) through the folder's chat template, prints only the
reply, and stops at the template's end-of-turn tokens:

  python -m transformer.generate --checkpoint=path/to/instruct-model --chat \
      --system="You are concise." --prompt="What is a transformer?"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax

from transformer.inference.beam import BeamConfig, BeamGeneration, beam_generate
from transformer.inference.decode import stream
from transformer.inference.sampling import SamplingConfig
from transformer.inference.seq2seq import seq2seq_beam_generate, seq2seq_generate

EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool = False,
               system: str | None = None) -> list[int]:
    """Ids of the prompt: plain text (with the tokenizer's special tokens), or under `chat` one user
    message (after an optional system message) in the chat template, ending in the assistant header."""
    if not chat:
        if system is not None:
            raise ValueError("a system message needs the chat template: pass --chat with --system")
        return list(tokenizer(prompt, padding=False)["input_ids"])
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def stream_text(
    tokenizer: Any, model: Any, prompt: str | Sequence[int], config: SamplingConfig, *,
    seed: int = 0, out: TextIO = sys.stdout,
) -> str:
    """Writes the continuation of `prompt` (text, or ids from `prompt_ids`) to `out` as tokens
    arrive; returns it."""
    if isinstance(prompt, str):
        prompt = prompt_ids(tokenizer, prompt)
    ids: list[int] = []
    shown = ""
    for token in stream(model, list(prompt), config, rng=jax.random.key(seed)):
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


def _stops_and_pad(tokenizer: Any, stop_ids: Sequence[int] | None,
                   chat: bool) -> tuple[tuple[int, ...], int]:
    """Stop ids (by default the chat template's end-of-turn ids under `chat`, else the tokenizer's
    eos) and the pad id."""
    template = getattr(tokenizer, "chat_template", None)
    if stop_ids is None and chat and template is not None:
        stop_ids = list(template.stop_ids)
    if stop_ids is None:
        stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return tuple(int(i) for i in stop_ids), pad


def sampling_config(tokenizer: Any, *, max_new_tokens: int, temperature: float, top_k: int,
                    top_p: float, stop_ids: Sequence[int] | None,
                    chat: bool = False) -> SamplingConfig:
    """Sampling settings; stop ids default to the chat template's end-of-turn ids under `chat`,
    else to the tokenizer's eos."""
    stops, pad = _stops_and_pad(tokenizer, stop_ids, chat)
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop_tokens=stops, pad_id=pad)


def beam_config(tokenizer: Any, *, num_beams: int, max_new_tokens: int, min_new_tokens: int = 0,
                length_penalty: float = 1.0, early_stopping: str = "false",
                num_return_sequences: int = 1, stop_ids: Sequence[int] | None = None,
                chat: bool = False) -> BeamConfig:
    """Beam search settings from the command line's (`early_stopping`: "true", "false" or
    "never"); stop ids as in `sampling_config`."""
    if early_stopping.lower() not in EARLY_STOPPING:
        raise ValueError(f"--early_stopping must be one of {sorted(EARLY_STOPPING)}, got "
                         f"{early_stopping!r}")
    stops, pad = _stops_and_pad(tokenizer, stop_ids, chat)
    return BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens,
                      min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                      early_stopping=EARLY_STOPPING[early_stopping.lower()],
                      num_return_sequences=num_return_sequences, stop_tokens=stops, pad_id=pad)


def input_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of an encoder-decoder's input: the tokenizer's, ending in its EOS (as T5 and BART
    read their inputs in training), added where the tokenizer does not add it."""
    ids = list(tokenizer(text, padding=False)["input_ids"])
    if tokenizer.eos_id is not None and (not ids or ids[-1] != tokenizer.eos_id):
        ids.append(tokenizer.eos_id)
    return ids


def seq2seq_text(tokenizer: Any, model: Any, ids: Sequence[int], config: SamplingConfig, *,
                 seed: int = 0, out: TextIO = sys.stdout) -> str:
    """An encoder-decoder's output for one input (ids), greedy or sampled; written and returned."""
    found = seq2seq_generate(model, [list(ids)], config, rng=jax.random.key(seed))
    tokens = found.sequences()[0]
    if tokens and tokens[-1] in config.stop_tokens:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    out.write(text + "\n")
    return text


def beam_texts(tokenizer: Any, model: Any, prompt: Sequence[int], config: BeamConfig, *,
               out: TextIO = sys.stdout) -> list[tuple[str, float]]:
    """The best continuations of `prompt` (ids) by beam search, with their scores (for an
    encoder-decoder: its best outputs for the input `prompt`); one is written as it reads on from
    the prompt, several each on a numbered line with its score."""
    search = (seq2seq_beam_generate if model.config.architecture == "encoder_decoder"
              else beam_generate)
    found: BeamGeneration = search(model, [list(prompt)], config)
    texts = []
    for ids, score in zip(found.sequences()[0], found.scores[0]):
        if ids and ids[-1] in config.stop_tokens:
            ids = ids[:-1]
        texts.append((tokenizer.decode(ids), float(score)))
    if len(texts) == 1:
        out.write(texts[0][0] + "\n")
    else:
        out.write("\n")
        for rank, (text, score) in enumerate(texts, 1):
            out.write(f"[{rank}] score={score:.4f}: {text}\n")
    return texts


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from transformer.locations import enable_compilation_cache
    from transformer.pretrained import from_pretrained

    FLAGS = flags.FLAGS
    del argv
    enable_compilation_cache()
    tokenizer, model = from_pretrained(FLAGS.checkpoint, quantize=FLAGS.quantize)
    if tokenizer is None:
        raise FileNotFoundError(f"{FLAGS.checkpoint} has no tokenizer files; generation needs "
                                "them (export the model with its tokenizer)")
    seq2seq = model.config.architecture == "encoder_decoder"
    _check_text_flags(FLAGS.checkpoint, seq2seq, FLAGS.prompt, FLAGS.input, FLAGS.chat)
    if seq2seq:
        ids = input_ids(tokenizer, FLAGS.input)
    else:
        try:
            ids = prompt_ids(tokenizer, FLAGS.prompt, chat=FLAGS.chat, system=FLAGS.system)
        except ValueError as error:  # no chat template, or one that refuses the messages
            raise ValueError(f"{FLAGS.checkpoint}: {error}") from None
    stop = None if FLAGS.stop_ids is None else [int(i) for i in FLAGS.stop_ids]
    if FLAGS.num_beams != 1:
        if FLAGS.temperature or FLAGS.top_k or FLAGS.top_p != 1.0:
            raise ValueError("beam search (--num_beams > 1) is deterministic: drop --temperature, "
                             "--top_k and --top_p, or pass --num_beams=1 to sample")
        config = beam_config(  # A ValueError for settings out of range.
            tokenizer, num_beams=FLAGS.num_beams, max_new_tokens=FLAGS.max_new_tokens,
            min_new_tokens=FLAGS.min_new_tokens, length_penalty=FLAGS.length_penalty,
            early_stopping=FLAGS.early_stopping,
            num_return_sequences=FLAGS.num_return_sequences, stop_ids=stop, chat=FLAGS.chat)
        if not FLAGS.chat and not seq2seq:
            sys.stdout.write(FLAGS.prompt)
        beam_texts(tokenizer, model, ids, config)
        return
    config = sampling_config(tokenizer, max_new_tokens=FLAGS.max_new_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                             stop_ids=stop, chat=FLAGS.chat)
    if seq2seq:
        seq2seq_text(tokenizer, model, ids, config, seed=FLAGS.seed)
        return
    if not FLAGS.chat:  # a continuation reads on from the prompt; a chat reply stands alone
        sys.stdout.write(FLAGS.prompt)
    stream_text(tokenizer, model, ids, config, seed=FLAGS.seed)


def _check_text_flags(checkpoint: str, seq2seq: bool, prompt: str | None, text: str | None,
                      chat: bool) -> None:
    """An encoder-decoder takes --input, a decoder --prompt; the other one is an error."""
    if seq2seq and (text is None or prompt is not None or chat):
        raise ValueError(f"{checkpoint} is an encoder-decoder: give the text to transform as "
                         "--input=... (not --prompt or --chat)")
    if not seq2seq and (prompt is None or text is not None):
        raise ValueError(f"{checkpoint} is a decoder: give the text to continue as --prompt=... "
                         "(--input is for encoder-decoders)")


if __name__ == "__main__":
    from absl import flags

    from transformer import cli

    flags.DEFINE_string("checkpoint", None, "our checkpoint directory or a Hugging Face folder")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "weight-only quantization of the loaded model (transformer.quantize)")
    flags.DEFINE_string("prompt", None, "the text to continue (with --chat: the user's message)")
    flags.DEFINE_string("input", None, "encoder-decoders: the text to transform (translate, "
                        "summarize, ...)")
    flags.DEFINE_bool("chat", False, "format --prompt with the folder's chat template as a user "
                      "message and stop at the template's end-of-turn tokens")
    flags.DEFINE_string("system", None, "with --chat: a system message before the user's")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise sample from softmax(logits / T)")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
    flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1 = all)")
    flags.DEFINE_integer("num_beams", 1, "beam search over this many hypotheses (1 = greedy or "
                         "sampling as set by --temperature)")
    flags.DEFINE_float("length_penalty", 1.0, "beam search: a finished hypothesis scores "
                       "sum logprob / new tokens ** length_penalty")
    flags.DEFINE_string("early_stopping", "false", "beam search: true (stop an input once "
                        "num_beams hypotheses ended), false (once no running one can beat them) "
                        "or never (as false, judging running ones at max_new_tokens)")
    flags.DEFINE_integer("min_new_tokens", 0, "beam search: no stop token before this many")
    flags.DEFINE_integer("num_return_sequences", 1, "beam search: print the best this many")
    flags.DEFINE_integer("seed", 0, "random seed of the sampling")
    flags.DEFINE_list("stop_ids", None, "token ids that end generation (default: the tokenizer's "
                      "EOS; with --chat the template's end-of-turn ids)")
    flags.mark_flags_as_required(["checkpoint"])
    cli.run(main)
