"""The objective registry: what the one training loop needs to know about a task, so that the
loop itself knows none.

An objective gives the model to build, the batches to train on, the loss (as sums over the
batch, so microbatches and devices combine exactly), the train metrics, an evaluator, and the
FLOPs of the output it computes on top of the layer stack (for MFU). Each objective module of
this package registers its objectives by name (`config.objective`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from transformer.models import ModelConfig

Batch = dict[str, jax.Array]
Builder = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    batch_axes: tuple[str, ...]  # Logical axes of the leading dims of every batch array.
    builder: Callable[[ModelConfig, ml_collections.ConfigDict], Builder]
    loss: Callable[[nnx.Module, Batch, jax.Array | None, ml_collections.ConfigDict], dict]
    summarize: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]  # sums → train metrics
    train_data: Callable[..., Iterator[dict[str, Any]]]  # (config, tokenizer) → batches
    evaluator: Callable[..., Callable[[Any, int], dict[str, float]]]  # see `make_evaluator`
    # Forward FLOPs per token of what the model computes on top of its layer stack, for MFU:
    # (model config, config, sequence length) → FLOPs (see transformer/train/flops.py).
    head_flops: Callable[[ModelConfig, ml_collections.ConfigDict, int], float]
    # Objectives that read a second, frozen model (distillation, objectives/distill.py):
    # config → config after `init_from` (e.g. the student's architecture from the teacher's), and
    # (config, mesh, rules) → the frozen model (`graphdef`, `params`, `shardings`,
    # `init_student(params, params_sharding)`); its model reaches `loss` as `teacher=`.
    resolve: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None
    teacher: Callable[..., Any] | None = None
    # DP-SGD (transformer/train/dp.py): (config, tokenizer loader) → the examples of the training
    # split, the units the guarantee protects (n of the sampling rate q = expected batch / n).
    dataset_size: Callable[[ml_collections.ConfigDict, Callable[[], Any]], int] | None = None


OBJECTIVES: dict[str, Objective] = {}

# The metric that selects the best checkpoint, by objective (the key its evaluator reports).
BEST_METRIC: dict[str, str] = {}


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown config.objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def mean_of(sums: dict[str, jax.Array], key: str) -> jax.Array:
    return sums[key] / jnp.maximum(sums["weight_sum"], 1.0)
