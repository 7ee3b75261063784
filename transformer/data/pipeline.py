"""grain input pipelines for pretraining (packed causal LM / masked LM) and fine-tuning tasks.

    config = default_config(); config.tokenizer = ".../gpt2"; config.local_format = "text"
    config.local_files.train = "corpus/*.txt"
    ds = create_pretraining_dataset(config, "train", process_index=jax.process_index(),
                                    process_count=jax.process_count())
    it = iter(ds)                   # a grain DatasetIterator: it.get_state() / it.set_state(s)
    batch = next(it)                # numpy dict, leading dim = global_batch_size / process_count

Each process reads a contiguous, disjoint part of the split (the parts cover it) and shuffles it
with the same seed, so the stream of one process depends only on (config, process_index,
process_count, worker_count). Save the iterator with orbax via
`grain.checkpoint.CheckpointSave(item=it)`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.experimental import FlatMapIterDataset, FlatMapTransform, ThreadPrefetchIterDataset

from transformer.data import local_builder, masking, packing, sources, task_packing, tasks
from transformer.data.tokenizer import Tokenizer, load_tokenizer


def default_config() -> ml_collections.ConfigDict:
    """Every field of the data config, with its meaning."""
    c = ml_collections.ConfigDict()
    # Where records come from: a TFDS catalog dataset, or local files built into one.
    c.dataset = ""  # TFDS catalog name (e.g. "lm1b", "glue/sst2"); "" = local files below
    c.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir; None = TFDS default
    c.local_format = ""  # text|jsonl|csv|tsv|conll|squad|semeval ("" = the task's own format)
    c.local_files = ml_collections.ConfigDict()  # split name -> file, glob, or comma-separated list
    c.local_options = ml_collections.ConfigDict()  # reader options, e.g. document="blank_line"
    c.cache_dir = ""  # where local datasets are built; "" = $TRANSFORMER_DATA_CACHE or ~/.cache
    c.train_split = "train"  # split names used by the trainer
    c.eval_split = "validation"
    c.text_key = "text"  # pretraining: the record field holding a document's text
    # What to make of the records.
    c.tokenizer = ""  # path given to load_tokenizer (a file or a directory)
    c.task = ""  # fine-tuning task name (tasks.TASKS); "" = pretraining
    c.objective = "causal"  # pretraining objective: "causal" (next token) or "mlm" (masked LM)
    c.max_length = 512  # tokens per row (pretraining: packed row length)
    c.add_eos = True  # causal: end every document with EOS so the model learns where texts stop
    c.mlm_probability = 0.15  # mlm: fraction of (non-special) tokens selected for prediction
    c.mask_fraction = 0.8  # mlm: of the selected, replaced by [MASK]
    c.random_fraction = 0.1  # mlm: of the selected, replaced by a random token (rest kept)
    c.whole_word_masking = False  # mlm: select whole words instead of single subwords
    c.doc_stride = 128  # QA: context tokens shared by consecutive windows
    c.max_query_length = 64  # QA: question tokens kept
    c.on_error = "raise"  # bad records: "raise" an error naming file and line, or "skip" + count
    # fine-tuning: pack several examples per row, each its own segment (classification, token
    # classification, relation; see task_packing). The examples per step are unchanged.
    c.pack_examples = True
    c.pack_row_multiple = 0  # packed rows grow in steps of this (0 = an eighth of the batch)
    c.sft_max_examples = 0  # sft: training conversations read per file (0 = all)
    c.sft_max_eval_examples = 0  # sft: evaluation conversations read per file (0 = all)
    # sft: a Jinja chat template file for a tokenizer without one ("" = the tokenizer's own)
    c.chat_template = ""
    # Order, batching and parallelism.
    c.global_batch_size = 32  # rows per step over all processes; each gets global / process_count
    c.seed = 0  # shuffling and masking seed
    c.shuffle = True  # shuffle training records (each epoch differently)
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # training epochs; None = forever
    c.worker_count = 0  # grain worker processes for reading + tokenizing; 0 = in this process
    c.worker_buffer_size = 2  # batches each worker prepares ahead
    c.prefetch_buffer_size = 2  # batches a background thread prepares ahead when worker_count=0
    return c


def open_source(config: ml_collections.ConfigDict, split: str, fmt: str | None = None):
    """The random-access records of `split`: the TFDS catalog dataset or the built local one."""
    if config.dataset:
        return sources.catalog_source(config.dataset, split, config.data_dir)
    fmt = config.local_format or fmt
    if not fmt:
        raise ValueError("set config.dataset (TFDS name) or config.local_format + local_files")
    files = config.local_files.to_dict()
    if split not in files:
        raise KeyError(f"config.local_files has no split {split!r}; it has {sorted(files)}")
    files = {s: (f.split(",") if isinstance(f, str) else list(f)) for s, f in files.items()}
    build = local_builder.build_local_dataset(
        fmt, files, cache_dir=config.cache_dir or None, on_error=config.on_error,
        **config.local_options.to_dict(),
    )
    for name, report in build.reports.items():
        if report.counts:
            logging.info("local %s split %s: %s", fmt, name, report.summary())
    return build.sources[split]


def per_process_batch(config: ml_collections.ConfigDict, process_count: int) -> int:
    if config.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by {process_count} "
            "processes"
        )
    return config.global_batch_size // process_count


def _records(config, split, process_index, process_count, train, fmt=None,
             min_records: int = 0) -> grain.MapDataset:
    ds = grain.MapDataset.source(open_source(config, split, fmt))
    start, end = sources.shard_bounds(len(ds), process_index, process_count)
    ds = ds[start:end]
    if len(ds) < min_records:  # E.g. 3 training records and a batch of 8.
        raise ValueError(
            f"split {split!r} holds {len(ds)} records for this process, fewer than its batch of "
            f"{min_records} (data.global_batch_size={config.global_batch_size}): every batch would "
            "repeat records; lower data.global_batch_size or give more data")
    if train:
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        ds = ds.repeat(config.num_epochs)
    return ds.map(sources.decode_strings)


@dataclasses.dataclass
class TokenizeDocument:
    """record → {"tokens": int32[n]} with the document's special tokens (runs in workers)."""

    tokenizer: Tokenizer
    text_key: str
    objective: str
    add_eos: bool

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.text_key not in record:
            raise KeyError(f"record has no field {self.text_key!r} (config.text_key): {list(record)}")
        tok, ids = self.tokenizer, self.tokenizer.encode(record[self.text_key])
        if self.objective == "mlm" and tok.template == "bert":
            ids = [tok.cls_id, *ids, tok.sep_id]
        else:
            if tok.template == "bos":
                ids = [tok.bos_id, *ids]
            if self.add_eos and tok.eos_id is not None:
                ids = [*ids, tok.eos_id]
        return {"tokens": np.asarray(ids, np.int32)}


@dataclasses.dataclass
class MaskBatch:
    config: masking.MaskingConfig

    def __call__(self, rows: dict[str, np.ndarray], rng: np.random.Generator):
        out = masking.mask_tokens(rows["tokens"], rows["segment_ids"], self.config, rng)
        return {**out, "segment_ids": rows["segment_ids"], "positions": rows["positions"]}


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads the leading dim to `size` with zeros (weights 0, labels -100 where labels are [B,T])."""
    n = next(iter(batch.values())).shape[0]
    if n == size:
        return batch
    out = {}
    for k, v in batch.items():
        fill = tasks.IGNORE if k == "labels" and v.ndim == 2 else 0
        out[k] = np.concatenate([v, np.full((size - n, *v.shape[1:]), fill, v.dtype)])
    return out


def _finish(ds: grain.IterDataset, config) -> grain.IterDataset:
    if config.worker_count > 0:
        return ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    if config.prefetch_buffer_size > 0:
        return ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch_buffer_size)
    return ds


def create_pretraining_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
) -> grain.IterDataset:
    """Packed LM batches: inputs, targets, weights, segment_ids, positions ([B, T] each).

    `train=False` reads the split once, in order, and pads the last batch with weight-0 rows,
    so every token is scored exactly once.
    """
    tok = tokenizer or load_tokenizer(config.tokenizer)
    if config.objective not in ("causal", "mlm"):
        raise ValueError(f"config.objective must be 'causal' or 'mlm', got {config.objective!r}")
    batch = per_process_batch(config, process_count)
    ds = _records(config, split, process_index, process_count, train, "text")
    ds = ds.map(TokenizeDocument(tok, config.text_key, config.objective, config.add_eos))
    rows = packing.PackIterDataset(ds.to_iter_dataset(), config.max_length)
    rows = rows.batch(batch, drop_remainder=train)
    if not train:
        rows = rows.map(functools.partial(pad_batch, size=batch))
    if config.objective == "causal":
        out = rows.map(packing.causal_lm_batch)
    else:
        mask_config = masking.MaskingConfig.for_tokenizer(
            tok, whole_word=config.whole_word_masking, select_probability=config.mlm_probability,
            mask_fraction=config.mask_fraction, random_fraction=config.random_fraction)
        out = rows.random_map(MaskBatch(mask_config), seed=config.seed)
    return _finish(out, config)


class _Flatten(FlatMapTransform):
    max_fan_out = 256  # QA windows of one example; far above SQuAD's longest context

    def flat_map(self, features):
        return [{k: v for k, v in f.items() if k not in HOST_KEYS} for f in features]


HOST_KEYS = ("example_id", "offset_mapping")  # kept on the host for mapping QA answers back


def _preprocessor(config, tokenizer) -> tasks.Preprocessor:
    return tasks.Preprocessor(
        tasks.get_task(config.task), tokenizer or load_tokenizer(config.tokenizer),
        max_length=config.max_length, on_error=config.on_error, doc_stride=config.doc_stride,
        max_query_length=config.max_query_length)


def create_task_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    pack_row_multiple: int | None = None,
) -> grain.IterDataset:
    """Shuffled, repeated training batches of `config.task` (see `tasks` for the format),
    packed into rows (`task_packing`) in steps of `pack_row_multiple` rows when given."""
    pre = _preprocessor(config, tokenizer)
    batch = per_process_batch(config, process_count)
    ds = _records(config, split, process_index, process_count, True, pre.task.local_format,
                  min_records=batch)
    ds = FlatMapIterDataset(ds.map(pre).to_iter_dataset(), _Flatten())
    ds = ds.batch(batch, drop_remainder=True)
    if pack_row_multiple:
        ds = ds.map(functools.partial(task_packing.pack_task_batch, row_multiple=pack_row_multiple))
    return _finish(ds, config)


@dataclasses.dataclass
class EvalSet:
    """Fixed-shape evaluation batches; `weights` is 0 on padding. `example_ids`/`offset_mapping`
    (QA) are per feature, in batch order, padding excluded. `report`: skipped/truncated counts."""

    batches: list[dict[str, np.ndarray]]
    num_features: int
    example_ids: list[str]
    offset_mapping: list[np.ndarray]
    report: sources.Report


def create_eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
) -> EvalSet:
    """Every feature of this process's part of `split` exactly once, in batches of equal shape.

    For one-feature-per-example tasks all processes get the same number of batches; for QA
    (windows per example vary) pass the same `num_batches` on every process.
    """
    pre = _preprocessor(config, tokenizer)
    records = _records(config, split, process_index, process_count, False, pre.task.local_format)
    features = [f for record in records for f in pre(record)]
    size = per_process_batch(config, process_count)
    if num_batches is None:
        total = len(grain.MapDataset.source(open_source(config, split, pre.task.local_format)))
        most = math.ceil(total / process_count)
        num_batches = max(math.ceil(len(features) / size), math.ceil(most / size))
    if num_batches * size < len(features):
        raise ValueError(f"num_batches={num_batches} holds fewer than {len(features)} features")
    keys = [k for k in features[0] if k not in HOST_KEYS] if features else []
    batches = []
    for b in range(num_batches):
        chunk = features[b * size : (b + 1) * size]
        if chunk:
            stacked = {k: np.stack([f[k] for f in chunk]) for k in keys}
        else:  # this process ran out before the others: an all-padding batch
            stacked = {k: np.zeros((0, *np.shape(features[0][k])), np.asarray(features[0][k]).dtype)
                       for k in keys}
        batches.append(pad_batch(stacked, size))
    if pre.report.counts:
        logging.info("eval %s/%s: %s", config.task, split, pre.report.summary())
    return EvalSet(
        batches, len(features), [f.get("example_id", "") for f in features],
        [f["offset_mapping"] for f in features if "offset_mapping" in f], pre.report,
    )
