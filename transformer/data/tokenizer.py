"""One tokenizer interface for every vocabulary, `load_tokenizer`, and a CLI to train one.

Implementations wrap the `sentencepiece` and Hugging Face `tokenizers` libraries, so ids equal those
of the reference implementations. The Hugging Face-like `__call__` adds special tokens the way the
model family expects (`[CLS] a [SEP] b [SEP]` for BERT, `<s> a` for Llama, nothing for GPT-2).

CLI:
  python -m transformer.data.tokenizer train --input=a.txt,b.txt --model_prefix=/tmp/sp \
      --vocab_size=8000 --model_type=unigram
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import itertools
import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from transformer.data.chat import ChatTemplate, Message

SPECIAL_NAMES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
# How `__call__` wraps sequences: BERT ([CLS] a [SEP] b [SEP]), Llama (<s> a <s> b) or GPT-2 (a b).
Template = Literal["bert", "bos", "none"]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """Token ids of one text and the character span [start, end) of each token in that text."""

    ids: list[int]
    offsets: list[tuple[int, int]]


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements; special-token ids are None when absent."""

    pad_id: int | None = None
    unk_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    template: Template = "none"
    chat_template: ChatTemplate | None = None  # from the folder's tokenizer_config.json (data/chat.py)
    chat_folder: str | None = None  # where `load_tokenizer` looked for the chat template

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce."""

    @abc.abstractmethod
    def batch_encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Ids and character offsets of each text, without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string, None if it is not in the vocabulary."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""
        return self.batch_encode([text])[0].ids

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """A conversation laid out by the model's chat template, as ids (or text): the format an
        instruct model was trained on. Raises, naming the fix, when the tokenizer has no template."""
        from transformer.data import chat

        return chat.apply_chat_template(self, messages, add_generation_prompt, tokenize)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Embedding-table rows: the vocabulary rounded up so the matmul tiles evenly."""
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def special_ids(self) -> dict[str, int]:
        """The special tokens present, by name."""
        pairs = ((n, getattr(self, f"{n}_id")) for n in SPECIAL_NAMES)
        return {n: i for n, i in pairs if i is not None}

    def is_word_start(self, token: str) -> bool:
        """Whether a vocabulary string begins a word (for whole-word masking)."""
        return not (self.template == "bert" and token.startswith("##"))

    def word_start_table(self) -> np.ndarray:
        """bool[vocab_size]: True for tokens that begin a word."""
        return np.array(
            [self.is_word_start(self.id_to_token(i)) for i in range(self.vocab_size)], bool
        )

    def add_special_tokens(
        self, a: list[int], b: list[int] | None = None
    ) -> tuple[list[int], list[int], list[int]]:
        """(ids, token_type_ids, is_special) of one sequence or a pair wrapped per `template`."""
        if self.template == "bert":
            cls, sep = [self.cls_id], [self.sep_id]
            ids = cls + a + sep
            types = [0] * len(ids)
            if b is not None:
                ids += b + sep
                types += [1] * (len(b) + 1)
            special = [1] + [0] * len(a) + [1] + ([] if b is None else [0] * len(b) + [1])
            return ids, types, special
        head = [self.bos_id] if self.template == "bos" else []
        ids, special = head + a, [1] * len(head) + [0] * len(a)
        if b is not None:
            ids, special = ids + head + b, special + [1] * len(head) + [0] * len(b)
        return ids, [0] * len(ids), special

    def num_special_tokens(self, pair: bool) -> int:
        """How many special tokens `add_special_tokens` inserts."""
        if self.template == "bert":
            return 3 if pair else 2
        return (2 if pair else 1) if self.template == "bos" else 0

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        return_tensors: Literal["np", "jax"] | None = None,
        padding: bool | Literal["longest", "max_length"] = True,
        truncation: bool = True,
        max_length: int | None = None,
        return_offsets_mapping: bool = False,
    ) -> dict[str, Any]:
        """Model inputs like a Hugging Face tokenizer: `model(**tokenizer("Hi", return_tensors="jax"))`.

        Returns input_ids, attention_mask and (for BERT-style vocabularies) token_type_ids; a single
        string gives unbatched lists unless `return_tensors` asks for arrays (then [1, T]).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
        enc_a = self.batch_encode(texts)
        enc_b = self.batch_encode(pairs) if pairs is not None else [None] * len(texts)
        rows = []
        for ea, eb in zip(enc_a, enc_b):
            a, oa = list(ea.ids), list(ea.offsets)
            b, ob = (list(eb.ids), list(eb.offsets)) if eb is not None else (None, None)
            if truncation and max_length is not None:
                budget = max_length - self.num_special_tokens(pair=b is not None)
                na, nb = truncate_longest_first(len(a), 0 if b is None else len(b), budget)
                a, oa = a[:na], oa[:na]
                if b is not None:
                    b, ob = b[:nb], ob[:nb]
            ids, types, special = self.add_special_tokens(a, b)
            spans = itertools.chain(oa, ob or [])
            offsets = [(0, 0) if is_special else next(spans) for is_special in special]
            rows.append((ids, types, offsets))
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        width = max_length if padding == "max_length" else max(len(r[0]) for r in rows)
        pad = self.pad_id if self.pad_id is not None else 0
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        offs = []
        for ids, types, offsets in rows:
            n = width - len(ids) if padding else 0
            out["input_ids"].append(ids + [pad] * n)
            out["attention_mask"].append([1] * len(ids) + [0] * n)
            out["token_type_ids"].append(types + [0] * n)
            offs.append(offsets + [(0, 0)] * n)
        if self.template != "bert":
            del out["token_type_ids"]  # only BERT-style models have a segment embedding
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        if return_tensors is None:
            return {k: v[0] for k, v in out.items()} if single else out
        if not padding and len({len(r) for r in out["input_ids"]}) > 1:
            raise ValueError("return_tensors needs padding=True for texts of different lengths")
        arrays = {k: np.asarray(v, np.int32) for k, v in out.items()}
        if return_tensors == "jax":
            import jax.numpy as jnp  # imported lazily: the data layer itself never needs JAX

            arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
        elif return_tensors != "np":
            raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}")
        return arrays


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after 'longest first' truncation to `budget` tokens, as Hugging Face `tokenizers`.

    Only the longer sequence is cut while that suffices; otherwise the shorter keeps
    budget // 2 tokens and the longer the rest (on a tie the first sequence is the shorter).
    """
    budget = max(budget, 0)
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_b == 0:
        return min(len_a, budget), 0
    swap = len_a > len_b
    short, long = (len_b, len_a) if swap else (len_a, len_b)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    return (long, short) if swap else (short, long)


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Loads a tokenizer, choosing the implementation from the files present.

    Accepts a file (`*.model` SentencePiece, `tokenizer.json`, BERT `vocab.txt`, GPT-2
    `encoder.json`/`vocab.json`) or a directory holding them; `tokenizer.json` wins when present.
    The chat template of the folder (Hugging Face `tokenizer_config.json` or `chat_template.jinja`),
    if any, comes with it as `chat_template`.
    """
    from transformer.data import chat

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    directory = path.parent if path.is_file() else path
    tokenizer = _load_vocabulary(path)
    tokenizer.chat_folder = str(directory)
    tokenizer.chat_template = chat.load_chat_template(directory, tokenizer)
    return tokenizer


def _load_vocabulary(path: pathlib.Path) -> Tokenizer:
    from transformer.data import hf_tokenizers, sentencepiece_tokenizer

    if path.is_file():
        directory, names = path.parent, [path.name]
    else:
        directory, names = path, sorted(p.name for p in path.iterdir())
    if "tokenizer.json" in names:
        return hf_tokenizers.from_tokenizer_json(directory / "tokenizer.json")
    for name in names:
        if name.endswith(".model"):
            return sentencepiece_tokenizer.SentencePieceTokenizer.load(directory / name)
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if vocab in names or merges in names:
            if not (directory / vocab).is_file() or not (directory / merges).is_file():
                raise FileNotFoundError(f"GPT-2 BPE needs both {vocab} and {merges} in {directory}")
            return hf_tokenizers.gpt2_tokenizer(directory / vocab, directory / merges)
    if "vocab.txt" in names:
        return hf_tokenizers.wordpiece_tokenizer(directory / "vocab.txt")
    raise FileNotFoundError(
        f"no tokenizer files in {path}: expected tokenizer.json, *.model, vocab.txt, "
        "or encoder.json + vocab.bpe"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`train`: a SentencePiece model from text files (one sentence or document per line)."""
    from transformer.data import sentencepiece_tokenizer

    parser = argparse.ArgumentParser(prog="python -m transformer.data.tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model")
    train.add_argument("--input", required=True, help="comma-separated text files (.gz ok)")
    train.add_argument("--model_prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    train.add_argument("--vocab_size", type=int, default=8000)
    train.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--character_coverage", type=float, default=0.9995)
    train.add_argument("--max_sentences", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    tok = sentencepiece_tokenizer.train_sentencepiece(
        args.input.split(","),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
    )
    print(f"wrote {args.model_prefix}.model ({tok.vocab_size} pieces)")


if __name__ == "__main__":
    main()
