"""What a resumed run checks and repairs before it trains on: the config it continues with, and
the metrics and evaluations the interrupted run may have lost or written twice.

Steps after the restored checkpoint are trained again, so their metric lines are dropped (else a
kill between a line and its checkpoint writes them twice); an evaluation that was due at the
restored step and has no line (a kill during it) is run before training continues.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ml_collections
from etils import epath

# Fields that define the optimization a checkpoint continues: changing one on resume makes a run
# that no single config describes. (num_train_steps may grow: that is how a run is extended.)
OPTIMIZATION_FIELDS = (
    "seed", "objective", "init_from", "learning_rate", "warmup_steps", "schedule",
    "end_lr_fraction", "weight_decay", "decay_norms", "decay_biases", "decay_embeddings",
    "adam_b1", "adam_b2", "adam_eps", "grad_clip_norm", "grad_accum_steps", "label_smoothing",
    "z_loss", "data.global_batch_size", "data.max_length", "data.seed", "data.dataset",
    "data.local_files", "data.objective", "data.task",
)


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved → now' for each optimization field that differs from the checkpoint's."""
    now = json.loads(json.dumps(config.to_dict(), default=str))
    saved = json.loads(json.dumps(saved, default=str))
    return [f"{f}: {_get(saved, f)!r} → {_get(now, f)!r}" for f in OPTIMIZATION_FIELDS
            if _get(saved, f) != _get(now, f)]


def check_config(saved: dict, config: ml_collections.ConfigDict, step: int) -> None:
    """Refuses to resume with a changed optimization unless `allow_config_change`."""
    if not (changes := config_changes(saved, config)):
        return
    if config.get("allow_config_change", False):
        logging.warning("resuming step %d with a changed config (allow_config_change): %s", step,
                        "; ".join(changes))
        return
    raise ValueError(
        f"the checkpoint at step {step} was trained with another config: {'; '.join(changes)}. "
        "Resume with the same values, use a fresh --workdir, or pass "
        "--config.allow_config_change=True to continue anyway")


def reconcile_metrics(path: epath.Path, step: int) -> set[int]:
    """Drops metric lines after `step` (and a line cut short by a kill); returns the steps that
    have an evaluation line. Only process 0 calls this."""
    if not path.exists():
        return set()
    kept, evaluated, dropped = [], set(), 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) > step:
            dropped += 1
            continue
        kept.append(line + "\n")
        if any(k.startswith("eval_") for k in row):
            evaluated.add(row["step"])
    if dropped:
        logging.info("metrics.jsonl: dropped %d line(s) after the restored step %d", dropped, step)
        temporary = path.parent / (path.name + ".tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)
    return evaluated


def evaluation_due(step: int, config: ml_collections.ConfigDict) -> bool:
    return step > 0 and bool(config.eval_every) and (
        step % config.eval_every == 0 or step == config.num_train_steps)
