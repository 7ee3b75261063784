"""Poisson-sampled fine-tuning batches for DP-SGD (transformer/train/dp.py).

Step t includes every training example independently with probability q (a Bernoulli draw per
example, seeded by (seed, t)), so the batch size varies; the batch is padded to a fixed number of
rows with weight-0 examples, which the private step ignores. Shuffling and epochs do not apply:
the sampling is the order. The dataset is a grain MapDataset over step numbers, so its iterator
state (the next step) is checkpointed with the model like the other pipelines, and a resumed run
draws the same batches.

With several processes, every process makes the same global draw and takes every
`process_count`-th selected example, each padding its part to `rows / process_count`.
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

    features: Any  # MapDataset: example index → list of its features (one for these tasks)
    n: int
    rate: float
    rows: int  # Rows of this process's batch.
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        chosen = np.flatnonzero(poisson_mask(self.seed, step, self.n, self.rate))
        chosen = chosen[self.process_index :: self.process_count]
        if len(chosen) > self.rows:  # ~3e-7 a step at the default margin (dp.BATCH_MARGIN_STDS).
            logging.warning("Poisson batch of step %d has %d examples for %d rows: %d dropped",
                            step, len(chosen), self.rows, len(chosen) - self.rows)
            chosen = chosen[: self.rows]
        features = [f for i in chosen for f in self.features[int(i)]]
        if not features:  # An empty draw: a batch of padding only (the step adds noise alone).
            features = [{k: np.zeros_like(v) for k, v in self.features[0][0].items()}]
            features[0]["weights"] = np.float32(0.0)
        batch = {k: np.stack([f[k] for f in features]) for k in features[0]}
        return pipeline.pad_batch(batch, self.rows)


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
) -> grain.IterDataset:
    """Poisson-sampled batches of `config.task`, each `global_batch_size / process_count` rows
    (weight 0 past the sampled examples); features as `pipeline.create_task_dataset` makes them."""
    pre = pipeline._preprocessor(config, tokenizer)
    records = grain.MapDataset.source(pipeline.open_source(config, split, pre.task.local_format))
    features = records.map(sources.decode_strings).map(pre)
    if not len(features):
        raise ValueError(f"the {split!r} split of {config.task!r} has no examples")
    sample = PoissonBatch(features, len(features), sampling_rate,
                          pipeline.per_process_batch(config, process_count), config.seed,
                          process_index, process_count)
    steps = grain.MapDataset.range(MAX_STEPS).map(sample)
    return pipeline._finish(steps.to_iter_dataset(), config)
