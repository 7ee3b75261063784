"""Local files → a TFDS ArrayRecord dataset, cached by content hash, read like catalog datasets.

    ds = build_local_dataset("tsv", {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"})
    ds.sources["validation"][0]        # random access, as tfds.data_source gives
    ds.builder.info.splits["train"].num_examples

The dataset lives in `cache_dir/<format>-<hash>/local_dataset/1.0.0/`, where the hash covers the
format, the options and every input file's bytes: editing a file builds a new dataset; rerunning
with the same files reuses the old one without reading them again beyond hashing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from transformer.data import readers
from transformer.data.sources import DataError, OnError, Report, handle
from transformer.locations import cache_dir, missing_dataset

# Bump when the stored features or parsing change, so old caches are not reused.
BUILDER_REVISION = "1"
_TEXT = tfds.features.Text


def default_cache_dir() -> pathlib.Path:
    return cache_dir("datasets")


def _feature_of(key: str, value: Any, where: str):
    if isinstance(value, bool):
        return np.bool_
    if isinstance(value, int):
        return np.int64
    if isinstance(value, float):
        return np.float32
    if isinstance(value, str):
        return _TEXT()
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tfds.features.Sequence(_TEXT())
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return tfds.features.Sequence(np.int64)
    raise DataError(f"{where}: field {key!r} has unsupported value {value!r} (use str, number, list)")


def check_value(key: str, value: Any, feature: Any, where: str) -> None:
    """A record's value must have its column's type (taken from the first record): else TFDS would
    fail with a bare TypeError (null) or silently cast (label 1.5 stored as 1)."""
    if value is None:
        raise DataError(f"{where}: field {key!r} is null; give it a value or drop the record")
    dtype = getattr(feature, "np_dtype", None)
    kind = np.dtype(dtype).kind if isinstance(dtype, type) and dtype is not object else None
    ok = {"b": isinstance(value, bool), "i": isinstance(value, int) and not isinstance(value, bool),
          "f": isinstance(value, int | float) and not isinstance(value, bool)}.get(kind, True)
    if isinstance(feature, tfds.features.Text):
        ok = isinstance(value, str)
    elif isinstance(feature, tfds.features.Sequence):
        ok = isinstance(value, list) and None not in value
    if not ok:
        expected = "text" if isinstance(feature, tfds.features.Text) else (
            "a list" if isinstance(feature, tfds.features.Sequence) else np.dtype(dtype).name)
        raise DataError(f"{where}: field {key!r} is {value!r} ({type(value).__name__}), but the "
                        f"column holds {expected} (as in the first record); make the column's "
                        "values one type")


def features_for(fmt: str, first: dict[str, Any] | None) -> tfds.features.FeaturesDict:
    """The TFDS features of a format; jsonl/csv/tsv take their fields from the first record."""
    fixed = {
        "text": {"text": _TEXT()},
        "conll": {"tokens": tfds.features.Sequence(_TEXT()), "tags": tfds.features.Sequence(_TEXT())},
        "squad": {
            "id": _TEXT(),
            "title": _TEXT(),
            "context": _TEXT(),
            "question": _TEXT(),
            "answers": tfds.features.Sequence({"text": _TEXT(), "answer_start": np.int32}),
        },
        "semeval": {"id": _TEXT(), "sentence": _TEXT(), "relation": _TEXT(), "comment": _TEXT()},
    }
    if fmt in fixed:
        spec = fixed[fmt]
    elif fmt in ("csv", "tsv"):
        spec = {k: _TEXT() for k in first if k != "source"}  # columns stay text; tasks parse labels
    else:
        where = first.get("source", "?")
        spec = {k: _feature_of(k, v, where) for k, v in first.items() if k != "source"}
    return tfds.features.FeaturesDict({**spec, "source": _TEXT()})


class LocalDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset made from local files by `readers`, stored as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, fmt, split_files, options, on_error, features, data_dir):
        self._fmt, self._split_files, self._options = fmt, split_files, options
        self._on_error, self._features = on_error, features
        self.reports: dict[str, Report] = {}
        super().__init__(data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Local {self._fmt} files: {json.dumps(self._split_files)}",
            features=self._features,
            disable_shuffling=True,  # keep file order: record i is the i-th one read
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, files) for split, files in
                self._split_files.items()}

    def _generate_examples(self, split, files):
        report = self.reports.setdefault(split, Report())
        keys = list(self._features.keys())
        index = 0  # integer keys keep the file order in the stored dataset
        for path in files:
            records = readers.read_records(
                path, self._fmt, on_error=self._on_error, report=report, **dict(self._options)
            )
            for number, example in enumerate(records):
                if number == 0 and self._fmt in ("csv", "tsv"):
                    self._check_columns(path, example, keys)
                missing = [k for k in keys if k not in example]
                if missing:
                    handle(
                        DataError(f"{example.get('source', path)}: missing field(s) {missing}"),
                        self._on_error, report, "missing_fields",
                    )
                    continue
                try:  # Columns typed by the first JSON record (csv/tsv columns are all text).
                    for k in keys if self._fmt == "jsonl" else ():
                        check_value(k, example[k], self._features[k], example.get("source", path))
                except DataError as e:
                    handle(e, self._on_error, report, "bad_values")
                    continue
                yield index, {k: example[k] for k in keys}
                index += 1


    def _check_columns(self, path: str, example: dict[str, Any], keys: list[str]) -> None:
        """Every file of a CSV/TSV dataset has the first file's columns: a label column missing
        from one file is that file's error, not a later one of another split."""
        first = next(f for files in self._split_files.values() for f in files)
        have, want = sorted(set(example) - {"source"}), sorted(set(keys) - {"source"})
        if have != want:
            raise DataError(f"{path}: columns {have} differ from those of {first}: {want}; "
                            "every file of the dataset needs the same header")


@dataclasses.dataclass
class LocalBuild:
    """A prepared local dataset: its builder, one data source per split, and parse reports."""

    builder: tfds.core.DatasetBuilder
    sources: dict[str, Any]
    reports: dict[str, Report]

    @property
    def splits(self) -> dict[str, int]:
        return {k: v.num_examples for k, v in self.builder.info.splits.items()}


def _expand(files: str | pathlib.Path | Sequence[str | pathlib.Path]) -> list[str]:
    patterns = [files] if isinstance(files, str | pathlib.Path) else list(files)
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no files match {pattern}")
        for m in matches:
            if not pathlib.Path(m).is_file():
                raise missing_dataset(m)
            out.append(str(pathlib.Path(m).resolve()))
    return out


def content_hash(fmt: str, split_files: Mapping[str, list[str]], options: Mapping, on_error) -> str:
    h = hashlib.sha256(json.dumps([BUILDER_REVISION, fmt, dict(options), on_error],
                                  sort_keys=True, default=str).encode())
    for split in sorted(split_files):
        h.update(split.encode())
        for path in split_files[split]:
            h.update(pathlib.Path(path).name.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def build_local_dataset(
    fmt: str,
    files: Mapping[str, str | pathlib.Path | Sequence[str | pathlib.Path]],
    *,
    cache_dir: str | pathlib.Path | None = None,
    on_error: OnError = "raise",
    **options: Any,
) -> LocalBuild:
    """Builds (or reuses) the ArrayRecord dataset of `files` ({split: file, glob or list}).

    `fmt` is one of text, jsonl, csv, tsv, conll, squad, semeval; `options` go to the reader
    (text: document='file'|'blank_line'|'line'; csv/tsv: columns=[...] when there is no header;
    conll: token_column, tag_column; jsonl: fields={name: type}).
    """
    if fmt not in readers.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(readers.FORMATS)}")
    split_files = {split: _expand(f) for split, f in files.items()}
    digest = content_hash(fmt, split_files, options, on_error)
    data_dir = pathlib.Path(cache_dir or default_cache_dir()) / f"{fmt}-{digest}"
    version_dir = data_dir / "local_dataset" / "1.0.0"
    report_file = version_dir / "parse_report.json"
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir / ".build.lock"):  # processes sharing a cache build it once
        return _build_or_reuse(fmt, split_files, options, on_error, data_dir, report_file)


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_or_reuse(fmt, split_files, options, on_error, data_dir, report_file) -> LocalBuild:
    version_dir = report_file.parent
    if report_file.is_file():  # prepared before: features and splits come from disk
        builder = tfds.builder_from_directory(str(version_dir))
        reports = {k: Report.from_json(v) for k, v in json.loads(report_file.read_text()).items()}
    else:
        first = None
        if fmt in ("jsonl", "csv", "tsv"):
            first_file = next(iter(split_files.values()))[0]
            first = next(readers.read_records(first_file, fmt, on_error="skip", **options), None)
            if first is None:  # reread strictly for the precise error
                list(readers.read_records(first_file, fmt, **options))
        builder = LocalDataset(
            fmt=fmt, split_files=split_files, options=options, on_error=on_error,
            features=features_for(fmt, first), data_dir=str(data_dir),
        )
        was_active = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)  # TFDS bars for a few local files are only noise
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
        finally:
            tfds.display_progress_bar(was_active)
        reports = builder.reports
        report_file.write_text(json.dumps({k: v.to_json() for k, v in reports.items()}))
    sources = {split: builder.as_data_source(split=split) for split in builder.info.splits}
    return LocalBuild(builder, sources, reports)
