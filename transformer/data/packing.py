"""Concatenate-and-split packing of token sequences into fixed-length rows, checkpointable.

Each row is filled with sequences end to end; a sequence that does not fit is cut, and its rest
starts the next row as a new segment. Every segment gets its own id (1, 2, ... within the row; 0 is
padding) and positions counted from 0, so attention masks built from segment ids never let one
document see another.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grain
import numpy as np


def _empty_row(length: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(length, np.int32) for k in ("tokens", "segment_ids", "positions")}


def pack_reference(sequences: Iterable[np.ndarray], length: int) -> list[dict[str, np.ndarray]]:
    """A plain loop over tokens that defines the packing; the iterator below must agree with it."""
    rows, row, fill, segment = [], _empty_row(length), 0, 0
    for seq in sequences:
        position, segment = 0, segment + 1
        for token in seq:
            if fill == length:
                rows.append(row)
                row, fill, segment, position = _empty_row(length), 0, 1, 0
            row["tokens"][fill], row["segment_ids"][fill] = token, segment
            row["positions"][fill] = position
            fill, position = fill + 1, position + 1
    if fill:
        rows.append(row)
    return rows


class PackIterDataset(grain.IterDataset):
    """Packs the `key` arrays of the parent's elements into rows of `length` tokens."""

    def __init__(self, parent: grain.IterDataset, length: int, key: str = "tokens"):
        super().__init__(parent)
        if length < 1:
            raise ValueError(f"packed length must be positive, got {length}")
        self._length, self._key = length, key

    def __iter__(self) -> PackDatasetIterator:
        return PackDatasetIterator(self._parent.__iter__(), self._length, self._key)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self._length})"


class PackDatasetIterator(grain.DatasetIterator):
    """State = the parent's state before the sequence now being split + tokens already used.

    Only the tail of at most one sequence is ever held between rows, so that pair restores
    the exact stream after `set_state`.
    """

    def __init__(self, parent: grain.DatasetIterator, length: int, key: str):
        super().__init__(parent)
        self._length, self._key = length, key
        self._pending: np.ndarray | None = None  # the sequence being consumed
        self._pending_state: dict[str, Any] | None = None
        self._used = 0  # tokens of _pending already placed in earlier rows

    def _next_sequence(self) -> bool:
        state = self._parent.get_state()
        try:
            element = next(self._parent)
        except StopIteration:
            return False
        seq = np.asarray(element[self._key] if isinstance(element, dict) else element, np.int32)
        self._pending, self._pending_state, self._used = seq.reshape(-1), state, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        row, fill, segment = _empty_row(self._length), 0, 0
        while fill < self._length:
            if self._pending is None or self._used == len(self._pending):
                self._pending = None
                if not self._next_sequence():
                    break
                if len(self._pending) == 0:
                    continue
            take = min(self._length - fill, len(self._pending) - self._used)
            segment += 1
            row["tokens"][fill : fill + take] = self._pending[self._used : self._used + take]
            row["segment_ids"][fill : fill + take] = segment
            row["positions"][fill : fill + take] = np.arange(take)
            fill, self._used = fill + take, self._used + take
        if fill == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None and self._used < len(self._pending):
            return {"parent": self._pending_state, "used": self._used}
        return {"parent": self._parent.get_state(), "used": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        if state["used"]:
            if not self._next_sequence():
                raise ValueError("iterator state points past the end of the data")
            self._used = state["used"]


def causal_lm_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """inputs/targets/weights of next-token prediction within each segment ([..., T] arrays)."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    targets = np.zeros_like(tokens)
    targets[..., :-1] = tokens[..., 1:]
    same = np.zeros(tokens.shape, bool)
    same[..., :-1] = (seg[..., 1:] == seg[..., :-1]) & (seg[..., :-1] > 0)
    return {
        "inputs": tokens.astype(np.int32),
        "targets": np.where(same, targets, 0).astype(np.int32),
        "weights": same.astype(np.float32),
        "segment_ids": seg.astype(np.int32),
        "positions": rows["positions"].astype(np.int32),
    }


def iterate_packed(sequences: Iterable[np.ndarray], length: int) -> Iterator[dict[str, np.ndarray]]:
    """Packs an in-memory iterable with the same code as the pipeline (for tools and tests)."""
    ds = grain.MapDataset.source([{"tokens": np.asarray(s)} for s in sequences]).to_iter_dataset()
    return iter(PackIterDataset(ds, length))
