"""Supervised fine-tuning examples: conversations rendered by the chat template, with loss weights.

A model is fine-tuned to write the assistant's turns, not to predict the user's text or the
template's headers, so each token carries a loss weight: 1 on the tokens of assistant turns
(their text and the end-of-turn token that closes them: the model must learn to stop), 0 on
everything else. `weights[t]` belongs to token t as a prediction target (the loss of predicting
`tokens[t]` from `tokens[:t]`), as the rows of `packing.causal_lm_batch` once shifted.

Local JSONL, one conversation a line, in either form:
    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": ..., "completion": ..., "system": ...}   (system optional: a user/assistant exchange)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from transformer.data import chat
from transformer.data.readers import read_records
from transformer.data.sources import DataError, OnError, Report, handle
from transformer.data.tokenizer import Tokenizer


def conversation(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a record in either JSONL form (checked: roles, contents)."""
    where = record.get("source", "record")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (a prompt/completion record "
                                "needs both)")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' fields, "
                        f"got fields {sorted(k for k in record if k != 'source')}")
    try:
        return chat.check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def sft_example(tokenizer: Tokenizer, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, loss weights: 1 on assistant tokens, else 0).

    Assistant message i spans the ids between the render of messages[:i] with the generation prompt
    and the render of messages[:i+1]; tokens after its last end-of-turn token (a newline the template
    writes between turns) get weight 0. A template for which the shorter render is not a prefix of the
    longer (one that moves the system prompt to the last user turn, say) cannot be split so: it raises.
    """
    where = record.get("source", "record")
    messages = conversation(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the assistant's reply")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message; put the user (or "
                        "system) message that it answers before it")
    if tokenizer.chat_template is None:
        tokenizer.apply_chat_template(messages)  # raises the error that names the fix
    template = tokenizer.chat_template
    assert template is not None
    stop = set(template.stop_ids)

    def ids(prefix: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        try:
            return chat.encode_rendered(tokenizer, template.render(prefix, generation_prompt))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None

    full = ids(messages, False)
    weights = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = ids(messages[:i], True), ids(messages[: i + 1], False)
        if after[: len(before)] != before or full[: len(after)] != after:
            raise DataError(
                f"{where}: the chat template of {template.folder} does not render the conversation "
                f"up to assistant message {i} as a prefix of the longer conversation (it rewrites "
                "earlier turns, e.g. moves the system prompt to the last user turn), so the assistant "
                "tokens cannot be located: drop the system message, keep one exchange per record, or "
                "use a template that appends turns"
            )
        span = after[len(before):]
        ends = [k for k, t in enumerate(span) if t in stop]
        if ends:
            span = span[: ends[-1] + 1]
        weights[len(before): len(before) + len(span)] = [1] * len(span)
    return full, weights


def read_sft_jsonl(
    path: str, tokenizer: Tokenizer, max_length: int, *, on_error: OnError = "raise",
    report: Report | None = None,
) -> Iterator[dict[str, Any]]:
    """{'tokens', 'loss_weights', 'source'} of each conversation of a JSONL file.

    Malformed lines and unusable conversations raise with file:line (on_error='raise') or are
    counted in `report` (on_error='skip'), as the other readers do. Over-long conversations, as the
    task preprocessors do, are truncated to their first `max_length` tokens and counted under
    'truncated'; one with no assistant token left within max_length is an error (raise or skip).
    """
    report = report if report is not None else Report()
    records = read_records(path, "jsonl", on_error=on_error, report=report)
    return sft_examples(records, tokenizer, max_length, on_error=on_error, report=report)


def sft_examples(
    records: Iterable[Mapping[str, Any]], tokenizer: Tokenizer, max_length: int, *,
    on_error: OnError = "raise", report: Report | None = None,
) -> Iterator[dict[str, Any]]:
    """`read_sft_jsonl` for records from any reader (e.g. `instructions.squad_conversations`)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    report = report if report is not None else Report()
    for record in records:
        where = record["source"]
        try:
            ids, weights = sft_example(tokenizer, record)
            if len(ids) > max_length:
                report.add("truncated", f"{where}: {len(ids)} → {max_length} tokens")
                ids, weights = ids[:max_length], weights[:max_length]
                if not any(weights):
                    raise DataError(f"{where}: no assistant token within max_length={max_length} "
                                    "(the prompt fills it): raise max_length or shorten the prompt")
        except DataError as e:
            handle(e, on_error, report, "bad_sft_example")
            continue
        yield {"tokens": np.asarray(ids, np.int32), "loss_weights": np.asarray(weights, np.float32),
               "source": where}
