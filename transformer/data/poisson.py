"""Poisson-sampled fine-tuning batches for DP-SGD (transformer/train/dp.py).

Step t includes every training example independently with probability q (a Bernoulli draw per
example, seeded by (seed, t)), so the batch size varies; the batch is padded to a fixed number of
rows with weight-0 examples, which the private step ignores. Shuffling and epochs do not apply:
the sampling is the order. The dataset is a grain MapDataset over step numbers, so its iterator
state (the next step) is checkpointed with the model like the other pipelines, and a resumed run
draws the same batches.

With several processes, every process makes the same global draw and takes every
`process_count`-th selected example, each padding its part to `rows / process_count`.

An example is one feature row (classification, token classification, relation; a document or a
conversation, transformer/data/dp_records.py), or with `windows` a block of that many rows: the
QA windows of one question, padded with weight-0 windows, so the private step clips the block as
one unit.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from transformer.data import pipeline, sources
from transformer.data.tokenizer import Tokenizer

# Steps the sampler can draw (grain needs a length; no run comes near it).
MAX_STEPS = 1 << 40


def poisson_mask(seed: int, step: int, n: int, rate: float) -> np.ndarray:
    """Which of the n examples step `step` includes (independent Bernoulli(rate) draws)."""
    return np.random.default_rng([seed, step]).random(n) < rate


@dataclasses.dataclass
class PoissonBatch:
    """step → the padded batch of its sampled features (runs in the loader, picklable)."""

    features: Any  # MapDataset: example index → list of its features (one but for QA)
    n: int
    rate: float
    rows: int  # Rows (examples) of this process's batch.
    seed: int
    process_index: int = 0
    process_count: int = 1
    windows: int = 0  # > 0: each example is a block of this many rows (QA windows).

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        chosen = np.flatnonzero(poisson_mask(self.seed, step, self.n, self.rate))
        chosen = chosen[self.process_index :: self.process_count]
        if len(chosen) > self.rows:  # ~3e-7 a step at the default margin (dp.BATCH_MARGIN_STDS).
            logging.warning("Poisson batch of step %d has %d examples for %d rows: %d dropped",
                            step, len(chosen), self.rows, len(chosen) - self.rows)
            chosen = chosen[: self.rows]
        examples = [self.features[int(i)] for i in chosen]
        if self.windows:
            features = [self._block(f, int(i)) for f, i in zip(examples, chosen) if f]
        else:
            features = [f for example in examples for f in example]
        if not features:  # An empty draw: a batch of padding only (the step adds noise alone).
            features = [_padding(self._template())]
        batch = {k: np.stack([f[k] for f in features]) for k in features[0]}
        return pipeline.pad_batch(batch, self.rows)

    def _template(self) -> dict[str, np.ndarray]:
        """A feature (or block) of the right shapes, for padding."""
        for i in range(self.n):
            if example := self.features[i]:
                return self._block(example, i) if self.windows else example[0]
        raise ValueError("no training example gave a feature")

    def _block(self, features: list[dict[str, np.ndarray]], index: int) -> dict[str, np.ndarray]:
        """An example's rows stacked into [windows, ...], padded with weight-0 rows."""
        if len(features) > self.windows:
            raise ValueError(
                f"training example {index} has {len(features)} windows, more than "
                f"dp.windows_per_example={self.windows}: raise dp.windows_per_example, or "
                "data.max_length / data.doc_stride so that contexts need fewer windows")
        features = [*features, *[_padding(features[0])] * (self.windows - len(features))]
        return {k: np.stack([f[k] for f in features]) for k in features[0]}


def _padding(feature: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A weight-0 row (or block) shaped like `feature`."""
    return {k: np.zeros_like(v) for k, v in feature.items()}


def _without_host_keys(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QA windows without what maps answers back to text (kept on the host, never batched)."""
    return [{k: v for k, v in f.items() if k not in pipeline.HOST_KEYS} for f in features]


def check_windows(features: grain.MapDataset, windows: int) -> None:
    """Every question must fit its block of `windows` rows: checked once before training (it
    tokenizes the split), not when a question is first sampled hours into a run."""
    from tqdm import tqdm

    counts = np.array([len(features[i]) for i in tqdm(range(len(features)), desc="QA windows",
                                                       unit="question", mininterval=5)])
    if counts.max() > windows:
        raise ValueError(
            f"{(counts > windows).sum()} training questions have more than dp.windows_per_example="
            f"{windows} windows (at most {counts.max()}): raise dp.windows_per_example to "
            f"{counts.max()}, or data.max_length / data.doc_stride so that contexts need fewer")
    logging.info("DP-SGD: a question is a block of %d windows (%.2f used on average, at most %d)",
                 windows, counts.mean(), counts.max())


def count_examples(config: ml_collections.ConfigDict, split: str, fmt: str | None) -> int:
    """Records in `split` (every one an example of a one-feature-per-example task)."""
    return len(pipeline.open_source(config, split, fmt))


def create_poisson_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    sampling_rate: float,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    windows: int = 0,
) -> grain.IterDataset:
    """Poisson-sampled batches of `config.task`, each `global_batch_size / process_count` rows
    (weight 0 past the sampled examples); features as `pipeline.create_task_dataset` makes them,
    QA windows in blocks of `windows` rows (dp.windows_per_example) without their host keys."""
    pre = pipeline._preprocessor(config, tokenizer)
    records = grain.MapDataset.source(pipeline.open_source(config, split, pre.task.local_format))
    features = records.map(sources.decode_strings).map(pre)
    if not len(features):
        raise ValueError(f"the {split!r} split of {config.task!r} has no examples")
    if pre.task.kind == "qa":
        features = features.map(_without_host_keys)
        check_windows(features, windows)
    return sampled_batches(features, config, sampling_rate, process_index, process_count,
                           windows=windows if pre.task.kind == "qa" else 0)


def sampled_batches(features: grain.MapDataset, config: ml_collections.ConfigDict,
                    sampling_rate: float, process_index: int = 0, process_count: int = 1,
                    windows: int = 0) -> grain.IterDataset:
    """Poisson-sampled, padded batches of `features` (example index → its list of features)."""
    sample = PoissonBatch(features, len(features), sampling_rate,
                          pipeline.per_process_batch(config, process_count), config.seed,
                          process_index, process_count, windows)
    steps = grain.MapDataset.range(MAX_STEPS).map(sample)
    return pipeline._finish(steps.to_iter_dataset(), config)
