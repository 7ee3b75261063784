"""Extractive QA features: question + context windows with a document stride, as Hugging Face.

Each window is `[CLS] question [SEP] context-part [SEP]`. Consecutive windows share `doc_stride`
context tokens. The answer's character span is mapped to token indices through the offsets; a
window that does not contain the whole answer points both positions at [CLS] (index 0).
`offset_mapping` ([T, 2], -1 outside the context) and `example_id` map predictions back to text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transformer.data.sources import DataError


def answer_token_span(
    offsets: list[tuple[int, int]], first: int, last: int, start_char: int, end_char: int
) -> tuple[int, int]:
    """Token indices [start, end] covering [start_char, end_char) within tokens first..last.

    (0, 0) when the answer is not entirely inside that range of tokens.
    """
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def windows(pre, example: dict[str, Any]) -> list[dict[str, Any]]:
    """All windows of one SQuAD example (`pre` is the task `Preprocessor`)."""
    tok = pre.tokenizer
    question, context = example["question"].lstrip(), example["context"]
    q_enc, c_enc = tok.batch_encode([question, context])
    q_ids = q_enc.ids[: pre.max_query_length]
    if len(q_ids) < len(q_enc.ids):
        pre.report.add("question_truncated", f"{example.get('id')}: {len(q_enc.ids)} tokens")
    budget = pre.max_length - len(q_ids) - tok.num_special_tokens(pair=True)
    if budget <= pre.doc_stride or budget <= 0:
        raise DataError(
            f"max_length {pre.max_length} leaves {budget} context tokens, not more than "
            f"doc_stride {pre.doc_stride}: raise max_length or lower doc_stride/max_query_length"
        )
    answers = example.get("answers") or {"text": [], "answer_start": []}
    texts, starts = list(answers["text"]), [int(s) for s in answers["answer_start"]]
    start_char = starts[0] if starts else -1
    end_char = start_char + len(texts[0]) if texts else -1
    features = []
    n = len(c_enc.ids)
    begin = 0
    while True:
        part = slice(begin, min(begin + budget, n))
        ids, types, special = tok.add_special_tokens(q_ids, c_enc.ids[part])
        ctx_first = len(ids) - (part.stop - part.start) - (1 if tok.template == "bert" else 0)
        offsets = [(-1, -1)] * len(ids)
        offsets[ctx_first : ctx_first + part.stop - part.start] = c_enc.offsets[part]
        if start_char >= 0:
            s, e = answer_token_span(
                offsets, ctx_first, ctx_first + part.stop - part.start - 1, start_char, end_char
            )
        else:
            s = e = 0
        offsets += [(-1, -1)] * (pre.max_length - len(offsets))
        features.append(pre.pad(
            ids, types,
            start_positions=np.int32(s), end_positions=np.int32(e),
            offset_mapping=np.array(offsets, np.int32), example_id=str(example.get("id", "")),
        ))
        if part.stop >= n:
            break
        begin += budget - pre.doc_stride
    return features
