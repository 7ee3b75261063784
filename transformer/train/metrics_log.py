"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files and a console progress bar.
Only process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm


class MetricLog:
    def __init__(self, workdir: pathlib.Path, *, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tensorboard = None
        self.bar = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
            desc="train", smoothing=0.1,
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line per logged step; eval metrics arrive prefixed `eval_`."""
        if not self.enabled:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        shown = {k: values[k] for k in ("loss", "eval_loss", "tokens_per_s", "mfu") if k in values}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()
