"""Tasks defined by a config rather than the registry: any CSV/TSV/JSONL with text and label
columns, or CoNLL files with their own tag set.

`data.task` names a registered task (sst2, conll2003, ...), or a new name; a new name is defined
from `config.objective` (its kind), `data.local_format`, `finetune.text_keys`, `finetune.label_key`
and `finetune.labels`. Without `finetune.labels` the label set is read from the training split, so
a label that appears only in the evaluation split fails with the file and line where it occurs.
"""

from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np

from transformer.data import pipeline, sources, tasks

BUILTIN = frozenset(tasks.TASKS)
_CACHE: dict[str, tasks.Task] = {}


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def resolve(config: ml_collections.ConfigDict) -> tasks.Task:
    """The task of `config`; a custom one is defined (and registered) on first use."""
    name, ft = config.data.task, config.finetune
    if not name:
        raise ValueError(f"config.objective={config.objective!r} needs data.task (a registered "
                         f"task: {sorted(BUILTIN)}, or a new name defined by config.finetune)")
    if name in BUILTIN:
        if ft.labels:
            raise ValueError(f"finetune.labels is for custom tasks; {name!r} has the labels "
                             f"{list(tasks.get_task(name).label_names)}")
        return tasks.get_task(name)
    key = json.dumps([name, config.objective, ft.to_dict(), config.data.local_format,
                      config.data.dataset, config.data.local_files.to_dict(),
                      config.data.train_split], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _define(config)
    task = _CACHE[key]
    tasks.TASKS[name] = task  # Preprocessing looks tasks up by name.
    return task


def _define(config: ml_collections.ConfigDict) -> tasks.Task:
    kind, ft, data = config.objective, config.finetune, config.data
    if kind not in ("classification", "token_classification"):
        raise ValueError(f"a custom task ({data.task!r}) can be 'classification' or "
                         f"'token_classification'; got objective {kind!r}")
    text_keys = _split(ft.text_keys) if kind == "classification" else ()
    if kind == "classification" and not 1 <= len(text_keys) <= 2:
        raise ValueError("finetune.text_keys must name one text column, or two for sentence "
                         f"pairs (comma-separated); got {ft.text_keys!r}")
    fmt = data.local_format or ("conll" if kind == "token_classification" else "")
    labels = _split(ft.labels) or _labels_of_split(config, kind, ft.label_key, fmt)
    logging.info("task %s: %d labels %s", data.task, len(labels), list(labels)[:20])
    return tasks.Task(data.task, kind, labels, "accuracy" if kind == "classification"
                      else "entity_f1", text_keys, ft.label_key, fmt or None)


def _labels_of_split(config, kind, label_key, fmt) -> tuple[str, ...]:
    """The distinct labels of the training split: 'O' first for tags, numbers in numeric order,
    other names sorted."""
    records = pipeline.open_source(config.data, config.data.train_split, fmt)
    seen = set()
    for i in range(len(records)):
        record = sources.decode_strings(records[i])
        if kind == "token_classification":
            seen.update(str(t) for t in record["tags"])
        else:
            if label_key not in record:
                raise KeyError(f"{record.get('source', '?')}: no label column {label_key!r} "
                               f"(finetune.label_key); columns: {sorted(record)}")
            value = record[label_key]
            seen.add(int(value) if isinstance(value, (int, np.integer)) else str(value))
    if not seen:
        raise ValueError(f"the training split {config.data.train_split!r} has no labels")
    if any(isinstance(v, int) for v in seen):
        # Integer labels are used as class indices: they must be exactly 0..C-1.
        if seen != set(range(len(seen))):
            raise ValueError(f"integer labels must be 0..C-1, got {sorted(seen)[:10]}; use text "
                             "labels or list them in finetune.labels")
        return tuple(str(v) for v in range(len(seen)))
    if kind == "token_classification":
        return ("O",) * ("O" in seen) + tuple(sorted(seen - {"O"}, key=lambda t: (t[2:], t)))
    numeric = all(v.lstrip("-").isdigit() for v in seen)
    return tuple(sorted(seen, key=int) if numeric else sorted(seen))
