"""Orbax checkpoints of the whole run: train state, data-iterator state and config.

A step's checkpoint becomes visible only when complete (orbax writes to a temporary directory and
renames it; on gs://, where a rename is a copy, it writes a commit_success.txt marker last), so a
run killed mid-save resumes from the previous complete checkpoint. One damaged afterwards (a
truncated array file, lost metadata, a garbled iterator state) is moved aside to `N.corrupt`,
never deleted, and the newest readable one is restored instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from transformer import paths

ITEMS = ("state", "data", "config")


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint of another model or optimizer: the config is wrong, not the files."""


class DamagedCheckpoint(RuntimeError):
    """A checkpoint whose files cannot be read back."""


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

    def is_save_step(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(
        self, step: int, state: Any, data_iterator: Any, config: dict[str, Any], *, force: bool = False
    ) -> bool:
        """Starts saving (returns at once when async); False when `step` is not a save step.

        Only multiples of `save_every` (and forced steps) are saved: Orbax would also save the
        first step it sees, a whole train state written while training has just begun."""
        if not force and not self.is_save_step(step):
            return False
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # A full disk, a failed write (this one or an earlier one).
            self._remove_partial()
            raise OSError(f"saving checkpoint {step} under {self.directory} failed: "
                          f"{_brief(error)}{_free_space(self.directory)}") from error

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """The state at `step` in the layout `abstract_state` describes; the data iterator is
        restored in place. IncompatibleCheckpoint for another model, DamagedCheckpoint for
        files that cannot be read."""
        try:
            saved = self.state_shapes(step)
        except Exception as error:
            raise DamagedCheckpoint(f"its state metadata cannot be read ({_brief(error)})") from error
        if saved is None:
            raise DamagedCheckpoint("its state metadata (state/_METADATA) is missing")
        check_shapes(saved, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self._has_data_state(step):
            items["data"] = grain.checkpoint.CheckpointRestore(item=data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise DamagedCheckpoint(_brief(error)) from error
        return restored["state"]

    def restore_newest(self, abstract_state: Any, data_iterator: Any) -> tuple[int | None, Any]:
        """(step, state) of the newest readable checkpoint, or (None, None) when there is none.
        Each unreadable one is moved aside (`N.corrupt`) with a one-line warning saying why."""
        tried = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except DamagedCheckpoint as error:
                aside = self._move_aside(step)
                logging.warning("checkpoint %s is unreadable: %s; moved it to %s and trying the "
                                "previous one", self.directory / str(step), error, aside)
                tried.append(f"{step} ({error})")
        if tried:
            raise DamagedCheckpoint(
                f"no readable checkpoint in {self.directory}: tried {'; '.join(tried)}. They are "
                "kept as N.corrupt; start again with a fresh --workdir, or repair one and rename "
                "it back to N")
        return None, None

    def _move_aside(self, step: int) -> Any:
        """Renames checkpoint `step` to `step.corrupt` (process 0; the others wait), so no
        later run takes it for a good one and nothing is lost."""
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt-{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def check_for_errors(self) -> None:
        """Raises a failed asynchronous save's error now, not at the next save."""
        try:
            self.manager.check_for_errors()
        except Exception as error:
            self._remove_partial()
            raise OSError(f"saving a checkpoint under {self.directory} failed: {_brief(error)}"
                          f"{_free_space(self.directory)}") from error

    def _remove_partial(self) -> None:
        """Orbax's temporary directories of a failed save: never taken for a checkpoint, but
        they hold the disk space that ran out."""
        if jax.process_index() != 0:
            return
        for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
            with contextlib.suppress(OSError):
                partial.rmtree() if partial.is_dir() else partial.unlink()

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


def _brief(error: BaseException) -> str:
    """An error in one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _free_space(directory: Any) -> str:
    import shutil

    try:
        free = shutil.disk_usage(str(directory)).free
    except OSError:  # gs://, or the directory is gone.
        return ""
    return f" ({free / 2**30:.2f} GiB free there)"


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
            raise IncompatibleCheckpoint(
                f"checkpoint has no entry {name!r} that this model needs; it was written by a "
                "different model or optimizer configuration"
            )
        if tuple(saved[name]) != shape:
            raise IncompatibleCheckpoint(
                f"checkpoint parameter {name!r} has shape {tuple(saved[name])} but this model "
                f"needs {shape}: the checkpoint is of a different model shape; use the config it "
                "was trained with, or a fresh --workdir"
            )
    if extra := sorted(set(saved) - set(wanted)):
        raise IncompatibleCheckpoint(
            f"checkpoint holds entries this model does not have: {extra[:5]}")
