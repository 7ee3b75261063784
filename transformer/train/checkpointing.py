"""Orbax checkpoints of the whole run: train state, data-iterator state and config.

A step's checkpoint becomes visible only when complete (orbax writes to a temporary directory and
renames it; on gs://, where a rename is a copy, it writes a commit_success.txt marker last), so a
run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from transformer import paths

ITEMS = ("state", "data", "config")


class Checkpointer:
    """Saves every `save_every` steps (asynchronously), keeps the last `max_to_keep` plus every
    `keep_period`-th, and restores onto any mesh: the abstract target carries the shardings."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.directory = paths.as_path(directory)  # Local or gs:// (Orbax takes either).
        self.save_every = save_every
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, state: Any, data_iterator: Any, config: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts saving (returns at once when async); False when `step` is not a save step.

        Only multiples of `save_every` (and forced steps) are saved: Orbax would also save the
        first step it sees, a whole train state written while training has just begun."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """The state at `step` in the layout `abstract_state` describes; the data iterator is
        restored in place."""
        check_shapes(self.state_shapes(step), abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._has_data_state(step):
            items["data"] = grain.checkpoint.CheckpointRestore(item=data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _has_data_state(self, step: int) -> bool:
        """Iterator states are per process: one saved by another process count cannot be
        restored, so the data then restarts from the beginning of this process's shard."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if (self.directory / str(step) / "data" / name).exists():
            return True
        logging.warning(
            "checkpoint %s has no data-iterator state for %d processes (it was saved by another "
            "process count): the train state is restored, the data restarts from the beginning",
            self.directory / str(step), jax.process_count())
        return False

    def state_shapes(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype), read without loading it."""
        return self.manager.item_metadata(step)["state"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _flat(tree: Any) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_metadata)[0]:
        name = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        flat[name] = leaf
    return flat


def check_shapes(saved_shapes: Any, abstract_state: Any) -> None:
    """Fail, naming the parameter and both shapes, if a checkpoint is of another model."""
    saved = {k: tuple(v.shape) for k, v in _flat(saved_shapes).items()}
    wanted = {k: tuple(v.shape) for k, v in _flat(abstract_state).items()}
    for name, shape in wanted.items():
        if name not in saved:
            raise ValueError(
                f"checkpoint has no entry {name!r} that this model needs; it was written by a "
                "different model or optimizer configuration"
            )
        if tuple(saved[name]) != shape:
            raise ValueError(
                f"checkpoint parameter {name!r} has shape {tuple(saved[name])} but this model "
                f"needs {shape}: the checkpoint is of a different model shape; use the config it "
                "was trained with, or a fresh --workdir"
            )
    if extra := sorted(set(saved) - set(wanted)):
        raise ValueError(f"checkpoint holds entries this model does not have: {extra[:5]}")
