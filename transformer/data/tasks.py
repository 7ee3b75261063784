"""Fine-tuning tasks by name: input fields, label set, metric, and preprocessing into features.

Every feature is padded to `max_length` with the batch format
  input_ids, attention_mask, token_type_ids   int32 [T]
  labels        int32 [] (classification, relation) or [T] (tokens: -100 where not scored)
  start_positions, end_positions  int32 []   (QA; both 0 = [CLS] when the window lacks the answer)
  entity_positions  int32 [2]                 (relation: indices of the [E1] and [E2] markers)
  weights       float32 []                    (1 for real examples; 0 for evaluation padding)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import numpy as np

from transformer.data.sources import DataError, OnError, Report, handle
from transformer.data.tokenizer import Tokenizer, truncate_longest_first

IGNORE = -100  # label of positions that are not scored (later subwords, special tokens, padding)
Kind = Literal["classification", "token_classification", "qa", "relation"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A fine-tuning task: what to read, which labels exist, how it is scored."""

    name: str
    kind: Kind
    label_names: tuple[str, ...]
    metric: str
    text_keys: tuple[str, ...] = ()  # classification: one field, or two for sentence pairs
    label_key: str = "label"
    local_format: str | None = None  # format of its local files for `build_local_dataset`

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name]


def _iob2(types: tuple[str, ...]) -> tuple[str, ...]:
    return ("O",) + tuple(f"{p}-{t}" for t in types for p in ("B", "I"))


SEMEVAL_RELATIONS = (
    "Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination", "Entity-Origin",
    "Instrument-Agency", "Member-Collection", "Message-Topic", "Product-Producer",
)
SEMEVAL_LABELS = ("Other",) + tuple(
    f"{r}({d})" for r in SEMEVAL_RELATIONS for d in ("e1,e2", "e2,e1")
)

register(Task("sst2", "classification", ("0", "1"), "accuracy", ("sentence",), "label", "tsv"))
register(Task("cola", "classification", ("0", "1"), "matthews_corr", ("sentence",), "label", "tsv"))
register(Task("qnli", "classification", ("entailment", "not_entailment"), "accuracy",
              ("question", "sentence"), "label", "tsv"))
register(Task("mnli", "classification", ("entailment", "neutral", "contradiction"), "accuracy",
              ("sentence1", "sentence2"), "gold_label", "tsv"))
register(Task("conll2003", "token_classification", _iob2(("PER", "ORG", "LOC", "MISC")),
              "entity_f1", local_format="conll"))
register(Task("wnut17", "token_classification", _iob2((
    "corporation", "creative-work", "group", "location", "person", "product")), "entity_f1",
    local_format="conll"))
register(Task("squad", "qa", (), "squad_em_f1", local_format="squad"))
register(Task("semeval2010_task8", "relation", SEMEVAL_LABELS, "semeval_macro_f1", ("sentence",),
              "relation", "semeval"))


@dataclasses.dataclass
class Preprocessor:
    """Turns one raw example into a list of features (QA may give several windows, a skip none).

    Picklable, so grain workers can run it. Over-long inputs are truncated and counted in
    `report` (per process: workers keep their own counts).
    """

    task: Task
    tokenizer: Tokenizer
    max_length: int = 128
    on_error: OnError = "raise"
    doc_stride: int = 128  # QA: tokens shared by consecutive context windows (as Hugging Face)
    max_query_length: int = 64
    report: Report = dataclasses.field(default_factory=Report)

    def __call__(self, example: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        try:
            if self.task.kind == "classification":
                return [self._classification(example)]
            if self.task.kind == "token_classification":
                return [self._tokens(example)]
            if self.task.kind == "relation":
                return [self._relation(example)]
            from transformer.data import qa

            return qa.windows(self, example)
        except DataError as e:
            handle(e, self.on_error, self.report, f"bad_{self.task.kind}_example")
            return []

    def field(self, example: dict[str, Any], key: str, setting: str) -> Any:
        """`example[key]`, or an error naming the config setting and the columns there are."""
        if key not in example:
            columns = sorted(k for k in example if k != "source")
            raise DataError(f"{example.get('source', '?')}: no column {key!r} ({setting}); the "
                            f"records have {columns}: name one of them in {setting}")
        return example[key]

    def label_index(self, example: dict[str, Any]) -> int:
        value = self.field(example, self.task.label_key, "finetune.label_key")
        names = self.task.label_names
        if isinstance(value, str) and value in names:
            return names.index(value)
        if isinstance(value, int | np.integer) and 0 <= value < len(names):
            return int(value)
        raise DataError(f"{example.get('source', '?')}: label {value!r} is not one of {list(names)}")

    def pad(self, ids: list[int], types: list[int], **extra) -> dict[str, np.ndarray]:
        n = self.max_length - len(ids)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out = {
            "input_ids": np.array(ids + [pad_id] * n, np.int32),
            "attention_mask": np.array([1] * len(ids) + [0] * n, np.int32),
            "token_type_ids": np.array(types + [0] * n, np.int32),
            "weights": np.float32(1.0),
        }
        out.update(extra)
        return out

    def _truncated(self, example: dict[str, Any], before: int, after: int) -> None:
        if after < before:
            self.report.add("truncated", f"{example.get('source', '?')}: {before} → {after} tokens")

    def _classification(self, example):
        label = self.label_index(example)
        texts = [self.field(example, k, "finetune.text_keys") for k in self.task.text_keys]
        if empty := [k for k, text in zip(self.task.text_keys, texts) if not str(text).strip()]:
            raise DataError(f"{example.get('source', '?')}: empty text in column {empty[0]!r}")
        encs = [e.ids for e in self.tokenizer.batch_encode(texts)]
        a, b = encs[0], (encs[1] if len(encs) > 1 else None)
        budget = self.max_length - self.tokenizer.num_special_tokens(pair=b is not None)
        na, nb = truncate_longest_first(len(a), len(b or []), budget)
        self._truncated(example, len(a) + len(b or []), na + nb)
        ids, types, _ = self.tokenizer.add_special_tokens(a[:na], None if b is None else b[:nb])
        return self.pad(ids, types, labels=np.int32(label))

    def _tokens(self, example):
        words, tags = list(example["tokens"]), list(example["tags"])
        names = self.task.label_names
        bad = [t for t in tags if t not in names]
        if bad or len(words) != len(tags):
            raise DataError(f"{example.get('source', '?')}: tag {bad[:1]} not in {list(names)}"
                            if bad else f"{example.get('source', '?')}: words and tags differ")
        # Byte-level BPE needs the space that separated the words to encode them as in running text.
        spaced = self.tokenizer.template == "none"
        pieces = self.tokenizer.batch_encode(
            [(" " + w if spaced and i else w) for i, w in enumerate(words)]
        )
        ids, labels = [], []
        for piece, tag in zip(pieces, tags):
            ids += piece.ids
            labels += [names.index(tag)] + [IGNORE] * (len(piece.ids) - 1)
        budget = self.max_length - self.tokenizer.num_special_tokens(pair=False)
        self._truncated(example, len(ids), min(len(ids), budget))
        ids, labels = ids[:budget], labels[:budget]
        full, types, special = self.tokenizer.add_special_tokens(ids)
        it = iter(labels)
        aligned = [IGNORE if s else next(it) for s in special]
        aligned += [IGNORE] * (self.max_length - len(aligned))
        return self.pad(full, types, labels=np.array(aligned, np.int32))

    def _relation(self, example):
        label = self.label_index(example)
        sentence = example[self.task.text_keys[0]]
        markers = relation_marker_ids(self.tokenizer)
        parts = [p for p in re.split(r"(</?e[12]>)", sentence) if p]
        texts = [p for p in parts if p not in markers]
        encoded = iter(self.tokenizer.batch_encode(texts))
        ids: list[int] = []
        starts = {}
        for p in parts:
            if p in markers:
                if p in ("<e1>", "<e2>"):
                    starts[p] = len(ids)
                ids.append(markers[p])
            else:
                ids += next(encoded).ids
        budget = self.max_length - self.tokenizer.num_special_tokens(pair=False)
        if len(starts) != 2:
            raise DataError(f"{example.get('source', '?')}: expected <e1> and <e2> markers")
        if max(starts.values()) >= budget:
            raise DataError(f"{example.get('source', '?')}: an entity lies beyond max_length")
        self._truncated(example, len(ids), min(len(ids), budget))
        full, types, special = self.tokenizer.add_special_tokens(ids[:budget])
        shift = special.index(0) if 0 in special else 0  # special tokens before the sentence
        positions = np.array([starts["<e1>"] + shift, starts["<e2>"] + shift], np.int32)
        return self.pad(full, types, labels=np.int32(label), entity_positions=positions)


RELATION_MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")


def relation_marker_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the entity markers: the marker itself if in the vocabulary, else BERT's [unused0-3],
    else the first ids past the vocabulary (inside `padded_vocab_size`: the embedding must have
    those rows, which a padded table does)."""
    found = [tokenizer.token_to_id(m) for m in RELATION_MARKERS]
    if None not in found:
        return dict(zip(RELATION_MARKERS, found))
    unused = [tokenizer.token_to_id(f"[unused{i}]") for i in range(4)]
    if None not in unused:
        return dict(zip(RELATION_MARKERS, unused))
    return {m: tokenizer.vocab_size + i for i, m in enumerate(RELATION_MARKERS)}
