"""Instruction data made from public datasets: SQuAD questions as chat conversations.

Each SQuAD v1.1 question becomes one exchange: the user gives the sentence of the context that
holds the answer and asks the question; the assistant replies with the answer span. A model that
learns it learns to read a short context and copy the part that answers: a small, real task whose
held-out answer loss and exact match say whether instruction tuning worked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from transformer.data.readers import read_records
from transformer.data.sources import OnError, Report

SYSTEM = "Answer the question with the words of the context that answer it."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def answer_sentence(context: str, start: int) -> str:
    """The sentence of `context` that holds character `start` (split after . ! ? and a space)."""
    offset = 0
    for sentence in _SENTENCE_END.split(context):
        begin = context.index(sentence, offset)
        if begin <= start < begin + len(sentence):
            return sentence
        offset = begin + len(sentence)
    return context


def squad_conversation(example: Mapping[str, Any], *, system: str | None = SYSTEM
                       ) -> dict[str, Any]:
    """One SQuAD example (as `readers.read_records(..., 'squad')` gives it) as a conversation."""
    answer, start = example["answers"]["text"][0], example["answers"]["answer_start"][0]
    context = answer_sentence(example["context"], start)
    if answer not in context:  # The answer crosses a sentence boundary: keep the paragraph.
        context = example["context"]
    messages = [{"role": "user", "content": f"Context: {context}\nQuestion: {example['question']}"},
                {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "source": example["source"], "answers": example["answers"]["text"]}


def conversations(path: str, fmt: str, *, on_error: OnError = "raise",
                  report: Report | None = None, limit: int | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Conversation records of a file: JSONL conversations as they are ('jsonl'), or SQuAD
    questions made into conversations ('squad'; questions without an answer are skipped and
    counted). `limit` keeps the first that many."""
    if fmt not in ("jsonl", "squad"):
        raise ValueError(f"SFT data format {fmt!r} is not one of ['jsonl', 'squad'] "
                         "(config.data.local_format)")
    count = 0
    for record in read_records(path, fmt, on_error=on_error, report=report):
        if limit is not None and count >= limit:
            return
        if fmt == "squad":
            if not record["answers"]["text"]:
                if report is not None:
                    report.add("unanswered_question", record["source"])
                continue
            record = squad_conversation(record)
        count += 1
        yield record
