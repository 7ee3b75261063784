"""Keep the best model by an evaluation metric: WORKDIR/best/ holds its parameters (our model
checkpoint format plus head_config.json), its evaluation outputs and best.json.

Kept apart from the run's Orbax checkpoints (which are the latest N, for resuming), so that
resuming never loses the best model and the best model never blocks resuming. Every process
takes the same decision (the metrics are computed identically everywhere); saving is collective.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
from etils import epath
from flax import nnx

from transformer import model_io, paths

BEST_FILE = "best.json"
HEAD_FILE = "head_config.json"


def save_task_model(directory: str | os.PathLike, model: nnx.Module, tokenizer: str = "") -> None:
    """Our model checkpoint format; a task model adds head_config.json (read by evaluate)."""
    directory = model_io.save_model(directory, model)
    if jax.process_index() != 0:
        return
    head = getattr(model, "head_config", None)
    if head is not None:
        (directory / HEAD_FILE).write_text(json.dumps(head.to_dict(), indent=1) + "\n")
    source = paths.as_path(tokenizer) if tokenizer else None
    if source is not None and source.is_dir():
        model_io.copy_tokenizer_files(source, directory / model_io.TOKENIZER_DIR)


class BestExport:
    def __init__(self, directory: str | os.PathLike, metric: str, mode: str):
        self.directory, self.metric, self.mode = paths.as_path(directory), metric, mode
        path = self.directory / BEST_FILE
        self.record = json.loads(path.read_text()) if path.is_file() else None

    @property
    def value(self) -> float | None:
        return None if self.record is None else self.record["value"]

    def better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, metrics: dict[str, float], graphdef: nnx.GraphDef, params: Any,
               tokenizer: str = "", eval_dir: epath.Path | None = None) -> bool:
        """Exports the model (graphdef, params) when `metrics` beat the best so far; returns
        whether it did."""
        if self.metric not in metrics:
            raise KeyError(f"best-checkpoint metric {self.metric!r} is not among the evaluation "
                           f"metrics {sorted(metrics)}; set --config.finetune.best_metric")
        value = float(metrics[self.metric])
        if not self.better(value):
            return False
        save_task_model(self.directory, nnx.merge(graphdef, params), tokenizer)
        self.record = {"step": step, "metric": self.metric, "value": value, "mode": self.mode,
                       "metrics": metrics}
        if jax.process_index() == 0:
            if eval_dir is not None and eval_dir.is_dir():
                for f in eval_dir.iterdir():
                    if f.is_file():
                        paths.copy_file(f, self.directory / f.name)
            (self.directory / BEST_FILE).write_text(json.dumps(self.record, indent=1) + "\n")
        logging.info("step %d: new best %s=%.4f → %s", step, self.metric, value, self.directory)
        return True
