"""SentencePiece tokenizers: Llama-style `tokenizer.model` files and models trained here."""

from __future__ import annotations

import gzip
import io
import itertools
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from transformer.data.tokenizer import Encoding, Template, Tokenizer

# Ids of the special tokens in models trained by `train_sentencepiece`; [CLS]/[SEP]/[MASK] are
# user-defined pieces so they are never split and always map to one id.
TRAIN_SPECIALS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
BERT_PIECES = ("[CLS]", "[SEP]", "[MASK]")


class SentencePieceTokenizer(Tokenizer):
    """A `sentencepiece` model; ids and offsets are the library's own."""

    def __init__(self, model_proto: bytes, template: Template | None = None):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        sp = self._sp

        def present(i: int) -> int | None:
            return i if 0 <= i < sp.get_piece_size() else None

        self.pad_id, self.unk_id = present(sp.pad_id()), present(sp.unk_id())
        self.bos_id, self.eos_id = present(sp.bos_id()), present(sp.eos_id())
        self.cls_id, self.sep_id, self.mask_id = (self.token_to_id(p) for p in BERT_PIECES)
        if template is None:
            has_cls_sep = self.cls_id is not None and self.sep_id is not None
            template = "bert" if has_cls_sep else ("bos" if self.bos_id is not None else "none")
        self.template = template

    @classmethod
    def load(cls, path: str | pathlib.Path, template: Template | None = None):
        """Reads a `.model` file."""
        return cls(pathlib.Path(path).read_bytes(), template)

    def save(self, path: str | pathlib.Path) -> None:
        """Writes the `.model` file."""
        pathlib.Path(path).write_bytes(self._proto)

    def __getstate__(self):  # the C++ processor cannot be pickled; grain workers need a copy
        return {"proto": self._proto, "template": self.template}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["template"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def is_word_start(self, token: str) -> bool:
        return token.startswith("\u2581") or token in BERT_PIECES

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def batch_encode(self, texts: Sequence[str]) -> list[Encoding]:
        protos = self._sp.encode(list(texts), out_type="proto")
        return [_encoding(t, p) for t, p in zip(texts, protos)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        return self._sp.decode(ids)


def _encoding(text: str, proto) -> Encoding:
    """Converts the library's byte offsets into character offsets.

    Pieces with an empty surface (a leading `▁` for stripped whitespace, all but the last byte of
    a byte-fallback character) are given the character they stand on, as Hugging Face does.
    """
    ids = [p.id for p in proto.pieces]
    spans = [(p.begin, p.end) for p in proto.pieces]
    if text.isascii():
        return Encoding(ids, [(b, e) if e > b or b >= len(text) else (b, b + 1) for b, e in spans])
    lengths = [len(c.encode("utf-8")) for c in text]
    char_of_byte = np.append(np.repeat(np.arange(len(text)), lengths), len(text))
    starts = np.cumsum([0, *lengths])
    offsets = []
    for b, e in spans:
        begin = int(char_of_byte[b])
        # A byte-fallback piece may end inside a character: round up to that character's end.
        end = int(np.searchsorted(starts, e, side="left"))
        offsets.append((begin, end) if end > begin or begin >= len(text) else (begin, begin + 1))
    return Encoding(ids, offsets)


def _read_lines(files: Iterable[str | pathlib.Path]) -> Iterable[str]:
    for f in files:
        f = pathlib.Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training input {f} does not exist")
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")


def train_sentencepiece(
    inputs: Sequence[str | pathlib.Path] | Iterable[str],
    *,
    model_prefix: str | pathlib.Path | None = None,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 1_000_000,
    bert_specials: bool = True,
    **trainer_kwargs,
) -> SentencePieceTokenizer:
    """Trains a unigram or BPE model with pad=0, unk=1, bos=2, eos=3 (+[CLS], [SEP], [MASK]).

    `inputs` is a list or tuple of text files (.gz ok; one sentence or paragraph a line), or any
    other iterable of strings (e.g. a generator) used as the training text itself. Writes
    `model_prefix.model`/`.vocab` when a prefix is given.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if isinstance(inputs, str | pathlib.Path):
        raise TypeError("pass a list of files or an iterator of strings, not one path")
    if isinstance(inputs, list | tuple):
        sentences = _read_lines(inputs)
    else:
        sentences = (s for s in inputs if s.strip())
    first = next(sentences, None)
    if first is None:
        raise ValueError("no training text given")
    sentences = itertools.chain([first], sentences)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        user_defined_symbols=list(BERT_PIECES) if bert_specials else [],
        minloglevel=2,
        **TRAIN_SPECIALS,
        **trainer_kwargs,
    )
    tok = SentencePieceTokenizer(proto.getvalue())
    if model_prefix is not None:
        tok.save(f"{model_prefix}.model")
        with open(f"{model_prefix}.vocab", "w", encoding="utf-8") as fh:
            for i in range(tok.vocab_size):
                fh.write(f"{tok.id_to_token(i)}\t{tok._sp.get_score(i)}\n")
    return tok
