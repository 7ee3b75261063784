"""Random-access record sources: TFDS catalog datasets (ArrayRecord) and the error policy.

Everything is read through `tfds` data sources (no TensorFlow), so grain can index, shard and
shuffle any split. Nothing here downloads: an unprepared dataset fails at once with the command
that prepares it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A record that cannot be used; the message names the file and line (or example id)."""


class DatasetNotPreparedError(FileNotFoundError):
    """A catalog dataset that is not on disk in ArrayRecord format."""


@dataclasses.dataclass
class Report:
    """Counts of records skipped or altered, by reason, with the first few messages of each.

    Readers and task preprocessing add to it under `on_error='skip'` (and for truncation, always),
    so nothing is dropped silently; `summary()` is logged by the pipelines.
    """

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_messages: int = 5

    def add(self, reason: str, message: str = "") -> None:
        self.counts[reason] += 1
        kept = self.messages.setdefault(reason, [])
        if message and len(kept) < self.max_messages:
            kept.append(message)

    def update(self, other: Report) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for m in other.messages.get(reason, []):
                self.add_message(reason, m)

    def add_message(self, reason: str, message: str) -> None:
        kept = self.messages.setdefault(reason, [])
        if len(kept) < self.max_messages:
            kept.append(message)

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "messages": self.messages}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        return cls(collections.Counter(d.get("counts", {})), dict(d.get("messages", {})))

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped or altered"
        parts = []
        for reason, n in sorted(self.counts.items()):
            first = self.messages.get(reason, [])
            parts.append(f"{reason}: {n}" + (f" (e.g. {first[0]})" if first else ""))
        return "; ".join(parts)


def handle(error: DataError, on_error: OnError, report: Report | None, reason: str) -> None:
    """Raises under 'raise'; counts the record as skipped under 'skip'."""
    if on_error == "raise":
        raise error
    if on_error != "skip":
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if report is not None:
        report.add(reason, str(error))
    logging.debug("skipped: %s", error)


def prepare_command(name: str, data_dir: str | None) -> str:
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    return f"tfds build {name} --file_format=array_record{dir_flag}"


def catalog_source(name: str, split: str, data_dir: str | None = None):
    """A TFDS catalog dataset split as a random-access source (`len`, `[i]`), never downloading.

    `name` may carry a config and version (`glue/sst2:2.0.0`). Raises `DatasetNotPreparedError`
    naming the `tfds build` command when the data is not on disk in ArrayRecord format.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0]
        raise DatasetNotPreparedError(f"{first} (not in the TFDS catalog)") from None
    command = prepare_command(name, data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; downloads are off. "
            f"Prepare it on a machine with network access with:\n  {command}"
        )
    if builder.info.file_format is None or builder.info.file_format.value != "array_record":
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format}, which has no random access; rebuild it with:\n  {command}"
        )
    if split not in builder.info.splits and "[" not in split:
        raise KeyError(f"{name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of this process's contiguous part of n records; parts differ by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return n * process_index // process_count, n * (process_index + 1) // process_count


def decode_strings(record: dict[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """TFDS data sources return text as bytes; turn them (and lists of them) into str."""
    out = {}
    for k, v in record.items():
        if keys is not None and k not in keys:
            out[k] = v
        elif isinstance(v, bytes):
            out[k] = v.decode("utf-8")
        elif isinstance(v, dict):
            out[k] = decode_strings(v)
        elif isinstance(v, list | tuple) and v and isinstance(v[0], bytes):
            out[k] = [x.decode("utf-8") for x in v]
        elif hasattr(v, "dtype") and v.dtype == object:
            out[k] = [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
        else:
            out[k] = v
    return out
