"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files and a console progress bar.
Only process 0 writes.

On gs:// an object cannot be appended to, so metrics.jsonl is rewritten whole (an earlier run's
lines kept) at most every `REMOTE_FLUSH_SECS` and at close; tensorboardX writes gs:// itself (with
google-cloud-storage, which gcsfs brings), uploading from its writer thread every `flush_secs`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from transformer import paths

REMOTE_FLUSH_SECS = 30.0


class MetricLog:
    def __init__(self, workdir: epath.Path, *, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.remote = paths.is_remote(workdir)
        self.lines = None
        self.tensorboard = None
        self.bar = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        if self.remote:
            self.lines = RewrittenLines(self.path, REMOTE_FLUSH_SECS)
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
        line = json.dumps({"step": step, "time": time.time(), **values}) + "\n"
        if self.lines is not None:
            self.lines.append(line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        if not self.remote:  # A gs:// flush uploads the whole event file: left to the writer thread.
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
        if self.lines is not None:
            self.lines.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class RewrittenLines:
    """A text file on an object store that grows by lines: kept in memory and rewritten whole.
    The first line is written at once (so a run shows up early), later ones at most every
    `every` seconds; a crash loses at most that much."""

    def __init__(self, path: epath.Path, every: float):
        self.path, self.every = path, every
        self.lines = [path.read_text()] if path.exists() else []  # A resumed run's earlier lines.
        self.dirty, self.last_flush = False, -float("inf")

    def append(self, line: str) -> None:
        self.lines.append(line)
        self.dirty = True
        if time.monotonic() - self.last_flush >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.dirty:
            self.path.write_text("".join(self.lines))
            self.dirty, self.last_flush = False, time.monotonic()


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()
