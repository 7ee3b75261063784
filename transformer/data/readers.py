"""Parsers of local text formats into example dicts, with file:line in every error.

Each reader yields plain dicts whose `source` is "file:line" of the record, so later errors (a
label outside the label set) can still name where the record came from. Files are read as bytes
and decoded per line, so a non-UTF-8 byte is reported at its line; a UTF-8 byte-order mark (as
Excel writes) is dropped. CSV records follow the `csv` module's rules: a quoted field may span
lines.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from transformer.data.sources import DataError, OnError, Report, handle
from transformer.locations import missing_dataset

Line = tuple[int, str]  # (1-based line number, text without the line ending)


def _open(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _raw_lines(fh) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(fh, start=1):
        raw = raw.rstrip(b"\r\n")
        yield number, raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw


def _csv_records(fh) -> Iterator[list[tuple[int, bytes]]]:
    """The raw lines of each CSV record: the `csv` module decides where a record ends, so a quoted
    field may hold line breaks. (Decoding errors are reported later, by `_decode`.)"""
    taken: list[tuple[int, bytes]] = []

    def lines():
        for number, raw in _raw_lines(fh):
            taken.append((number, raw))
            yield raw.decode("utf-8", errors="replace") + "\n"

    for _ in csv.reader(lines()):
        record = taken[:]
        taken.clear()
        if any(raw.strip() for _, raw in record):
            yield record
    if taken:  # An unclosed quote at the end of the file.
        yield taken


def _raw_records(path: pathlib.Path, grouping: str) -> Iterator[list[tuple[int, bytes]]]:
    """Groups raw lines: 'line' (each non-blank line), 'block' (blank-line separated), 'file',
    'csv' (the lines of each CSV record)."""
    group: list[tuple[int, bytes]] = []
    with _open(path) as fh:
        if grouping == "csv":
            yield from _csv_records(fh)
            return
        for number, raw in _raw_lines(fh):
            blank = not raw.strip()
            if grouping == "line":
                if not blank:
                    yield [(number, raw)]
            elif grouping == "block" and blank:
                if group:
                    yield group
                group = []
            else:
                group.append((number, raw))
    if group:
        yield group


def _decode(path: pathlib.Path, raw: list[tuple[int, bytes]]) -> list[Line]:
    lines = []
    for number, data in raw:
        try:
            lines.append((number, data.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{number}: not valid UTF-8 (byte {data[e.start]:#04x} at column "
                f"{e.start + 1})"
            ) from None
    return lines


def read_records(
    path: str | pathlib.Path,
    fmt: str,
    *,
    on_error: OnError = "raise",
    report: Report | None = None,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Examples of one file in format `fmt` (see `FORMATS`); bad records raise or are counted."""
    path = pathlib.Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    if not path.is_file():
        raise missing_dataset(path)
    grouping, parse = FORMATS[fmt]
    if fmt == "text":
        grouping = {"file": "file", "blank_line": "block", "line": "line"}[
            options.pop("document", "file")
        ]
    state: dict[str, Any] = {"report": report, "on_error": on_error}
    found = seen = False
    for raw in _raw_records(path, grouping):
        seen = True
        try:
            lines = _decode(path, raw)
            for example in parse(path, lines, state, **options):
                found = True
                yield example
        except DataError as e:
            handle(e, on_error, report, f"bad_{fmt}_record")
    if not seen:
        handle(DataError(f"{path}: the file is empty"), on_error, report, "empty_file")
    elif not found:
        handle(DataError(f"{path}: no usable records"), on_error, report, "no_records")


def _where(path: pathlib.Path, lines: list[Line]) -> str:
    return f"{path}:{lines[0][0]}"


def _text(path, lines, state, strip: bool = True):
    text = "\n".join(t for _, t in lines)
    text = text.strip() if strip else text
    if text:
        yield {"text": text, "source": _where(path, lines)}


def _jsonl(path, lines, state, fields: dict[str, type] | None = None):
    ((number, line),) = lines
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    if fields is not None:
        missing = [k for k in fields if k not in record]
        if missing:
            raise DataError(f"{path}:{number}: missing field(s) {missing}")
        record = {k: record[k] for k in fields}
    yield {**record, "source": f"{path}:{number}"}


def _delimited(path, lines, state, delimiter: str = ",", columns: list[str] | None = None):
    number = lines[0][0]
    try:
        row = next(csv.reader([t + "\n" for _, t in lines], delimiter=delimiter,
                              quoting=_quoting(delimiter)))
    except csv.Error as e:
        raise DataError(f"{path}:{number}: malformed CSV record ({e})") from None
    header = state.get("header")
    if header is None:
        state["header"] = header = list(columns) if columns else row
        if len(set(header)) != len(header):
            raise DataError(f"{path}:{number}: repeated column names {header}")
        if not columns:
            return
    if not any(field.strip() for field in row):
        return  # A row of empty fields, as spreadsheets write below the data.
    if len(row) != len(header):
        raise DataError(
            f"{path}:{number}: {len(row)} fields, expected {len(header)} ({header})"
        )
    yield {**dict(zip(header, row)), "source": f"{path}:{number}"}


def _quoting(delimiter: str) -> int:
    # GLUE TSVs contain bare quote characters in sentences: quotes are literal text there.
    return csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL


def _conll(path, lines, state, token_column: int = 0, tag_column: int = -1):
    tokens, tags = [], []
    for number, line in lines:
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            if state["report"] is not None:
                state["report"].add("docstart_lines")
            continue
        if len(cols) < 2:
            raise DataError(f"{path}:{number}: expected 'token ... tag' columns, got {line!r}")
        tokens.append(cols[token_column])
        tags.append(cols[tag_column])
    if tokens:
        yield {"tokens": tokens, "tags": tags, "source": _where(path, lines)}


def _squad(path, lines, state):
    try:
        data = json.loads("\n".join(t for _, t in lines))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (no top-level 'data' list)")
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context", "")
            for qa in paragraph.get("qas", []):
                try:
                    yield _squad_example(path, article, context, qa)
                except DataError as e:
                    handle(e, state["on_error"], state["report"], "bad_squad_question")


def _squad_example(path, article, context, qa):
    qid = qa.get("id", "?")
    if not qa.get("question") or not context:
        raise DataError(f"{path}: question {qid} has no question text or context")
    answers = qa.get("answers", [])
    for a in answers:
        start = a.get("answer_start", -1)
        if context[start : start + len(a.get("text", ""))] != a.get("text") or start < 0:
            raise DataError(f"{path}: question {qid}: answer {a} does not match the context")
    return {
        "id": qid,
        "title": article.get("title", ""),
        "context": context,
        "question": qa["question"],
        "answers": {
            "text": [a["text"] for a in answers],
            "answer_start": [a["answer_start"] for a in answers],
        },
        "source": f"{path}:{qid}",
    }


_SEMEVAL_SENTENCE = re.compile(r'^(\d+)\t"(.*)"$')
_SEMEVAL_LABEL = re.compile(r"^(Other|[A-Za-z]+-[A-Za-z]+\((e1,e2|e2,e1)\))$")


def _semeval(path, lines, state):
    if len(lines) != 3:
        raise DataError(
            f"{path}:{lines[0][0]}: expected 3 lines (sentence, relation, comment), got {len(lines)}"
        )
    (n1, sentence_line), (n2, label), (n3, comment) = lines
    m = _SEMEVAL_SENTENCE.match(sentence_line)
    if not m:
        raise DataError(f'{path}:{n1}: expected \'ID<TAB>"sentence"\', got {sentence_line[:60]!r}')
    sentence = m.group(2)
    for tag in ("<e1>", "</e1>", "<e2>", "</e2>"):
        if sentence.count(tag) != 1:
            raise DataError(f"{path}:{n1}: expected one {tag} in the sentence")
    if not _SEMEVAL_LABEL.match(label.strip()):
        raise DataError(f"{path}:{n2}: malformed relation label {label!r}")
    if not comment.startswith("Comment:"):
        raise DataError(f"{path}:{n3}: expected a 'Comment:' line, got {comment[:40]!r}")
    yield {
        "id": m.group(1),
        "sentence": sentence,
        "relation": label.strip(),
        "comment": comment[len("Comment:") :].strip(),
        "source": f"{path}:{n1}",
    }


Parser = Callable[..., Iterator[dict[str, Any]]]
FORMATS: dict[str, tuple[str, Parser]] = {
    "text": ("file", _text),
    "jsonl": ("line", _jsonl),
    "csv": ("csv", _delimited),
    "tsv": ("line", lambda p, ls, s, **kw: _delimited(p, ls, s, **{"delimiter": "\t", **kw})),
    "conll": ("block", _conll),
    "squad": ("file", _squad),
    "semeval": ("block", _semeval),
}
