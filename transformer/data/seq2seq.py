"""Sequence-to-sequence data: (source, target) text pairs → packed encoder/decoder rows.

Records come from local JSONL/CSV/TSV files (the columns named by `seq2seq.source_key` and
`seq2seq.target_key`), from aligned line files (`data.local_format='parallel'`: `PREFIX.de` and
`PREFIX.en` line by line, gzip or not, as Multi30K ships), or from a prepared TFDS catalog dataset
(`data.dataset`, with the same key settings). A target may hold several references (a JSON list,
or several columns: `target_key='ref1,ref2'`): training sees each as its own example, evaluation
scores against all of them.

Training rows are packed: whole pairs placed one after another, each its own segment (ids 1, 2, ...
on both sides, 0 = padding, positions from 0 per segment), encoder rows of `data.max_length` and
decoder rows of `seq2seq.max_target_length` tokens:

  inputs, segment_ids, positions                      int32 [B, S]
  decoder_inputs, decoder_segment_ids, decoder_positions, targets   int32 [B, T]
  weights                                             float32 [B, T]  (1 on real target tokens)

`decoder_inputs` are the targets shifted right within each segment, the first one
`model.decoder_start_token_id` (T5: pad, BART: eos). Bad records fail naming the file and line, or
under `data.on_error='skip'` are counted and logged: a missing column, an empty source or target.
Sources and targets longer than their rows are truncated (their EOS kept), counted and logged.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.experimental import FlatMapIterDataset, FlatMapTransform

from transformer.data import pipeline, sources
from transformer.data.sources import DataError, Report, handle
from transformer.data.tokenizer import Tokenizer, load_tokenizer
from transformer.locations import missing_dataset

SOURCE_KEYS = ("inputs", "segment_ids", "positions")
TARGET_KEYS = ("decoder_inputs", "decoder_segment_ids", "decoder_positions", "targets", "weights")


def default_config() -> ml_collections.ConfigDict:
    """`config.seq2seq`: what the records hold and how targets are shaped."""
    c = ml_collections.ConfigDict()
    c.source_key = "input"  # The record field (column) of the input text (not "source": local
    # readers keep that name for the record's file:line).
    c.target_key = "target"  # The target field; a JSON list or "a,b" (columns) = references.
    c.source_lang = "de"  # local_format='parallel': the source file is PREFIX.<source_lang>.
    c.target_lang = "en"  # ... and the target file PREFIX.<target_lang>.
    c.source_prefix = ""  # Text put before every source (T5: "translate German to English: ").
    c.max_target_length = 64  # Decoder row length (data.max_length is the encoder's).
    c.metrics = "bleu,chrf"  # Evaluation: generation metrics (bleu, chrf, rouge).
    c.max_decode_length = 0  # Evaluation: tokens generated per example (0 = max_target_length).
    c.num_beams = 1  # Evaluation: 1 = greedy; more = beam search (transformer/inference/beam.py).
    c.length_penalty = 1.0  # Beam search: finished score = log-probability / length ** this.
    c.eval_examples = 0  # Evaluation: first N examples of the split (0 = all).
    return c


# --- Records: local files, aligned line files, the TFDS catalog. ------------------------------


def _open_text(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: pathlib.Path) -> list[str]:
    with _open_text(path) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    return text.splitlines()


def _parallel_file(prefix: str, lang: str) -> pathlib.Path:
    for candidate in (pathlib.Path(f"{prefix}.{lang}"), pathlib.Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise missing_dataset(pathlib.Path(f"{prefix}.{lang}"))


def parallel_records(prefix: str, source_lang: str, target_lang: str) -> list[dict[str, Any]]:
    """Line i of PREFIX.<source_lang> with line i of PREFIX.<target_lang> (gzip or plain)."""
    src_path, tgt_path = _parallel_file(prefix, source_lang), _parallel_file(prefix, target_lang)
    src, tgt = _lines(src_path), _lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: aligned "
                        "files need one line per sentence on both sides")
    return [{"source": s, "target": t, "where": f"{src_path}:{i + 1}"}
            for i, (s, t) in enumerate(zip(src, tgt, strict=True))]


def read_records(data: ml_collections.ConfigDict, seq: ml_collections.ConfigDict,
                 split: str) -> list[dict[str, Any]]:
    """Every record of `split` as {"source", "target" (str or list), "where"}; a missing column
    fails at once, naming the columns the records have."""
    if not data.dataset and data.local_format == "parallel":
        files = data.local_files.to_dict()
        if split not in files:
            raise KeyError(f"config.data.local_files has no split {split!r}; it has {sorted(files)}")
        return [r for prefix in str(files[split]).split(",") if prefix
                for r in parallel_records(prefix, seq.source_lang, seq.target_lang)]
    target_keys = [k for k in str(seq.target_key).split(",") if k]
    if not data.dataset and "source" in (seq.source_key, *target_keys):
        raise ValueError("seq2seq.source_key/target_key 'source': local readers keep that name "
                         "for each record's file:line; rename the column (e.g. 'input')")
    source = pipeline.open_source(data, split, "jsonl")
    out = []
    for index in range(len(source)):
        record = sources.decode_strings(source[index])
        where = str(record.get("source", f"{data.dataset}[{split}][{index}]"))
        missing = [k for k in (seq.source_key, *target_keys) if k not in record]
        if missing:
            columns = sorted(k for k in record if k != "source" or data.dataset)
            raise ValueError(f"{where}: no column(s) {missing}; the records have {columns}. Set "
                             "--config.seq2seq.source_key / target_key to the right names")
        targets = [record[k] for k in target_keys]
        target = targets[0] if len(targets) == 1 else targets
        out.append({"source": record[seq.source_key], "target": target, "where": where})
    return out


# --- Tokenizing: records → (source ids, target ids) examples, bad ones counted. ---------------


def references(target: Any) -> list[str]:
    return [target] if isinstance(target, str) else [str(t) for t in target]


@dataclasses.dataclass
class Encode:
    """Tokenizes sources and targets, each ending in EOS; truncation keeps the EOS and is counted."""

    tokenizer: Tokenizer
    max_source_length: int
    max_target_length: int
    source_prefix: str = ""
    on_error: str = "raise"
    report: Report = dataclasses.field(default_factory=Report)

    def ids(self, text: str, limit: int, reason: str, where: str) -> np.ndarray:
        ids = self.tokenizer.encode(text)
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        if len(ids) + len(eos) > limit:
            self.report.add(reason, f"{where}: {len(ids) + len(eos)} tokens, limit {limit}")
            ids = ids[: limit - len(eos)]
        return np.asarray([*ids, *eos], np.int32)

    def source(self, record: dict[str, Any]) -> np.ndarray | None:
        """The record's source ids, or None (counted) when it cannot be used."""
        text = record["source"]
        if not isinstance(text, str) or not text.strip():
            handle(DataError(f"{record['where']}: empty source text"), self.on_error,
                   self.report, "empty_source")
            return None
        return self.ids(self.source_prefix + text, self.max_source_length, "truncated_source",
                        record["where"])

    def __call__(self, record: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        """One example per reference: {"inputs", "targets"}; none for a bad record."""
        refs = references(record["target"])
        if not refs or any(not r.strip() for r in refs):
            handle(DataError(f"{record['where']}: empty target text"), self.on_error,
                   self.report, "empty_target")
            return []
        inputs = self.source(record)
        if inputs is None:
            return []
        return [{"inputs": inputs, "targets": self.ids(r, self.max_target_length,
                                                       "truncated_target", record["where"])}
                for r in refs]


def encoder_for(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Encode:
    if tokenizer.eos_id is None:
        raise ValueError("seq2seq needs a tokenizer with an end-of-sequence token (eos_id)")
    return Encode(tokenizer, config.data.max_length, config.seq2seq.max_target_length,
                  config.seq2seq.source_prefix, config.data.on_error)


# --- Packing whole pairs into encoder and decoder rows. ---------------------------------------


def pack_pairs_reference(examples: Sequence[dict[str, np.ndarray]], source_length: int,
                         target_length: int) -> list[dict[str, np.ndarray]]:
    """A plain loop that defines the packing: a pair goes into the current row while both of its
    sides fit, else it starts the next row (examples are never split)."""
    rows, current = [], []
    for example in examples:
        used = [sum(len(e[k]) for e in current) for k in ("inputs", "targets")]
        if current and (used[0] + len(example["inputs"]) > source_length
                        or used[1] + len(example["targets"]) > target_length):
            rows.append(current)
            current = []
        current.append(example)
    if current:
        rows.append(current)
    return [pack_row(row, source_length, target_length) for row in rows]


def _side(sequences: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, ...]:
    tokens, segments, positions = (np.zeros(length, np.int32) for _ in range(3))
    fill = 0
    for k, seq in enumerate(sequences, start=1):
        n = len(seq)
        if fill + n > length:
            raise ValueError(f"a row of {length} tokens cannot hold {fill + n}")
        tokens[fill : fill + n], segments[fill : fill + n] = seq, k
        positions[fill : fill + n] = np.arange(n)
        fill += n
    return tokens, segments, positions


def pack_row(examples: Sequence[dict[str, np.ndarray]], source_length: int,
             target_length: int) -> dict[str, np.ndarray]:
    """The examples as one row, each its own segment on both sides (targets not yet shifted)."""
    inputs, segment_ids, positions = _side([e["inputs"] for e in examples], source_length)
    targets, target_segments, target_positions = _side([e["targets"] for e in examples],
                                                       target_length)
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions,
            "targets": targets, "decoder_segment_ids": target_segments,
            "decoder_positions": target_positions}


def teacher_forcing(rows: dict[str, np.ndarray], decoder_start_token_id: int) -> dict[str, np.ndarray]:
    """Adds decoder_inputs (targets shifted right within each segment, `decoder_start_token_id`
    first) and weights (1 on real target tokens); works on [T] rows and [B, T] batches."""
    targets, positions = rows["targets"], rows["decoder_positions"]
    shifted = np.zeros_like(targets)
    shifted[..., 1:] = targets[..., :-1]
    real = rows["decoder_segment_ids"] > 0
    decoder_inputs = np.where(positions == 0, decoder_start_token_id, shifted)
    return {**rows, "decoder_inputs": np.where(real, decoder_inputs, 0).astype(np.int32),
            "weights": real.astype(np.float32)}


class PairPackIterDataset(grain.IterDataset):
    """Packs the parent's {"inputs", "targets"} examples into rows (see `pack_pairs_reference`)."""

    def __init__(self, parent: grain.IterDataset, source_length: int, target_length: int):
        super().__init__(parent)
        self._lengths = (source_length, target_length)

    def __iter__(self) -> PairPackIterator:
        return PairPackIterator(self._parent.__iter__(), *self._lengths)


class PairPackIterator(grain.DatasetIterator):
    """State = the parent's state before the example that did not fit the last row, if any: the
    one example held between rows is read again after `set_state`."""

    def __init__(self, parent: grain.DatasetIterator, source_length: int, target_length: int):
        super().__init__(parent)
        self._lengths = (source_length, target_length)
        self._held: dict[str, np.ndarray] | None = None
        self._held_state: Any = None

    def __next__(self) -> dict[str, np.ndarray]:
        row, used = [], [0, 0]
        while True:
            if self._held is None:
                state = self._parent.get_state()
                try:
                    self._held, self._held_state = next(self._parent), state
                except StopIteration:
                    break
            sizes = (len(self._held["inputs"]), len(self._held["targets"]))
            if row and any(u + n > limit for u, n, limit in zip(used, sizes, self._lengths)):
                break
            row.append(self._held)
            used = [u + n for u, n in zip(used, sizes)]
            self._held = None
        if not row:
            raise StopIteration
        return pack_row(row, *self._lengths)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._held_state if self._held is not None
                else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held = None


class _Examples(FlatMapTransform):
    max_fan_out = 64  # References of one record.

    def __init__(self, encode: Encode):
        self.encode = encode

    def flat_map(self, record):
        return self.encode(record)


def create_seq2seq_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Shuffled, repeated batches of packed training rows (the module docstring's arrays)."""
    tok = tokenizer or load_tokenizer(config.data.tokenizer)
    records = read_records(config.data, config.seq2seq, split)
    encode = encoder_for(config, tok)
    log_report(records, encode, split)  # Counts bad and truncated records of the whole split.
    batch = pipeline.per_process_batch(config.data, process_count)
    start, end = sources.shard_bounds(len(records), process_index, process_count)
    ds = grain.MapDataset.source(records[start:end])
    if config.data.shuffle:
        ds = ds.shuffle(seed=config.data.seed)
    ds = ds.repeat(config.data.num_epochs)
    examples = FlatMapIterDataset(ds.to_iter_dataset(), _Examples(
        dataclasses.replace(encode, on_error="skip", report=Report())))
    rows = PairPackIterDataset(examples, config.data.max_length, config.seq2seq.max_target_length)
    batches = rows.batch(batch, drop_remainder=True).map(functools.partial(
        teacher_forcing, decoder_start_token_id=config.model.decoder_start_token_id))
    return pipeline._finish(batches, config.data)


def log_report(records: list[dict[str, Any]], encode: Encode, split: str) -> Report:
    """Encodes the split once, before training: bad records raise (on_error='raise') or are
    counted, and truncations counted; the summary is logged, so nothing is dropped silently."""
    report = Report()
    checker = dataclasses.replace(encode, report=report)
    for record in records:
        checker(record)
    logging.info("seq2seq split %s: %d records; %s", split, len(records), report.summary())
    return report


# --- Evaluation: each example once, one per row, with all its references. ----------------------


@dataclasses.dataclass
class EvalExamples:
    """Sources of `split` (this process's part), padded to one shape, with their references."""

    inputs: np.ndarray  # int32 [N, S] (0-padded)
    lengths: np.ndarray  # int32 [N]
    references: list[list[str]]
    report: Report


def eval_examples(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer,
                  process_index: int = 0, process_count: int = 1) -> EvalExamples:
    records = read_records(config.data, config.seq2seq, split)
    if config.seq2seq.eval_examples:
        records = records[: config.seq2seq.eval_examples]
    start, end = sources.shard_bounds(len(records), process_index, process_count)
    encode = encoder_for(config, tokenizer)
    ids, refs = [], []
    for record in records[start:end]:
        targets = references(record["target"])
        if not targets or any(not t.strip() for t in targets):
            handle(DataError(f"{record['where']}: empty target text"), encode.on_error,
                   encode.report, "empty_target")
            continue
        source = encode.source(record)
        if source is not None:
            ids.append(source)
            refs.append(targets)
    if encode.report.counts:
        logging.info("seq2seq eval split %s: %s", split, encode.report.summary())
    inputs = np.zeros((len(ids), config.data.max_length), np.int32)
    for i, seq in enumerate(ids):
        inputs[i, : len(seq)] = seq
    return EvalExamples(inputs, np.asarray([len(s) for s in ids], np.int32), refs, encode.report)

