"""WordPiece (BERT) and byte-level BPE (GPT-2) tokenizers on the Hugging Face `tokenizers` library."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import tokenizers
from tokenizers import implementations

from transformer.data.tokenizer import Encoding, Template, Tokenizer

# Vocabulary strings that name each special token, in the conventions of BERT, RoBERTa/Llama, GPT-2.
_SPECIAL_STRINGS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>",),
    "eos": ("</s>",),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "mask": ("[MASK]", "<mask>"),
}
GPT2_EOT = "<|endoftext|>"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`, used only for its model, normalizer and pre-tokenizer.

    Padding, truncation and special tokens of the wrapped object are switched off: the shared
    `Tokenizer.__call__` adds them, so every vocabulary behaves the same way.
    """

    def __init__(self, tok: tokenizers.Tokenizer, template: Template, word_prefix: str | None):
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.template = template
        self._word_prefix = word_prefix  # '##' marks WordPiece continuations; 'Ġ' GPT-2 word starts
        for name, strings in _SPECIAL_STRINGS.items():
            ids = [tok.token_to_id(s) for s in strings if tok.token_to_id(s) is not None]
            setattr(self, f"{name}_id", ids[0] if ids else None)
        eot = tok.token_to_id(GPT2_EOT)
        if eot is not None:  # GPT-2 uses one token as unk, bos and eos, like Hugging Face
            self.unk_id = self.bos_id = self.eos_id = eot

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_word_start(self, token: str) -> bool:
        if self._word_prefix == "##":
            return not token.startswith("##")
        if self._word_prefix is not None:
            return token.startswith(self._word_prefix)
        return True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def batch_encode(self, texts: Sequence[str]) -> list[Encoding]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [Encoding(e.ids, e.offsets) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _check(*paths: pathlib.Path) -> None:
    for p in paths:
        if not pathlib.Path(p).is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist")


def wordpiece_tokenizer(vocab_txt: str | pathlib.Path, lowercase: bool | None = None) -> HFTokenizer:
    """BERT WordPiece from `vocab.txt`; casing from a `tokenizer_config.json` beside it if any."""
    vocab_txt = pathlib.Path(vocab_txt)
    _check(vocab_txt)
    if lowercase is None:
        config = vocab_txt.parent / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.is_file() else {}
        lowercase = bool(settings.get("do_lower_case", True))
    impl = implementations.BertWordPieceTokenizer(str(vocab_txt), lowercase=lowercase)
    return HFTokenizer(impl._tokenizer, "bert", "##")


def gpt2_tokenizer(vocab_json: str | pathlib.Path, merges: str | pathlib.Path) -> HFTokenizer:
    """GPT-2 byte-level BPE from `encoder.json` (or `vocab.json`) and `vocab.bpe` (`merges.txt`)."""
    _check(vocab_json, merges)
    impl = implementations.ByteLevelBPETokenizer(
        str(vocab_json), str(merges), add_prefix_space=False, trim_offsets=False
    )
    tok = impl._tokenizer
    tok.add_special_tokens([tokenizers.AddedToken(GPT2_EOT, special=True)])
    return HFTokenizer(tok, "none", "\u0120")


def from_tokenizer_json(path: str | pathlib.Path) -> HFTokenizer:
    """Any `tokenizer.json`; the special-token template is read from its post-processor."""
    path = pathlib.Path(path)
    _check(path)
    tok = tokenizers.Tokenizer.from_file(str(path))
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {}).get("type")
    post = spec.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    first_special = first.get("SpecialToken", {}).get("id")
    if post.get("type") == "BertProcessing" or first_special == "[CLS]":
        template: Template = "bert"
    elif first_special is not None:
        template = "bos"
    else:
        template = "none"
    if model == "WordPiece":
        prefix = "##"
    elif (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        prefix = "\u0120"
    else:
        prefix = "\u2581" if model in ("Unigram", "BPE") else None
    return HFTokenizer(tok, template, prefix)
