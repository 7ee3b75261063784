"""A damaged checkpoint is moved aside (never deleted) and the newest readable one restored; a
failed save stops the run at once with the path and the free space; a resume with another
optimization is refused; metric lines after the restored step are dropped."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from transformer.train import resume
from transformer.train.checkpointing import Checkpointer, DamagedCheckpoint, IncompatibleCheckpoint

STATE = {"w": jnp.arange(4096.0), "b": {"x": jnp.ones((4, 4))}}


def abstract(tree):
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def write_checkpoints(directory: pathlib.Path, steps=(2, 4, 6)) -> None:
    ckpt = Checkpointer(directory, save_every=2)
    data, consumed = iterator(), 0
    for step in steps:
        while consumed < step:  # The iterator of checkpoint `step` has read `step` records.
            next(data)
            consumed += 1
        ckpt.save(step, jax.tree.map(lambda a, s=step: a * s, STATE), data, {"step": step})
    ckpt.wait()
    ckpt.close()


def largest_file(root: pathlib.Path) -> pathlib.Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated array file": lambda d: truncate(largest_file(d / "state")),
    "deleted state metadata": lambda d: os.remove(d / "state" / "_METADATA"),
    "garbled iterator state": lambda d: [p.write_text("{garbled") for p in (d / "data").glob("*.json")],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    write_checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / "6")
    ckpt = Checkpointer(tmp_path, save_every=2)
    data = iterator()
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_newest(abstract(STATE), data)
    assert step == 4
    np.testing.assert_array_equal(state["w"], np.asarray(STATE["w"]) * 4)
    assert next(data) == 4  # The iterator continues after the 4 records step 4 had read.
    assert (tmp_path / "6.corrupt").is_dir() and not (tmp_path / "6").exists()  # Moved, kept.
    assert ckpt.all_steps() == [2, 4]
    warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warning) == 1 and "moved it to" in warning[0] and "6.corrupt" in warning[0]
    assert "\n" not in warning[0]
    ckpt.close()


def test_no_readable_checkpoint_names_every_one_tried(tmp_path):
    write_checkpoints(tmp_path, steps=(2, 4))
    for step in (2, 4):
        os.remove(tmp_path / str(step) / "state" / "_METADATA")
    ckpt = Checkpointer(tmp_path, save_every=2)
    with pytest.raises(DamagedCheckpoint, match=r"no readable checkpoint in .*: tried 4 \(.*\); 2 "):
        ckpt.restore_newest(abstract(STATE), iterator())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.corrupt", "4.corrupt"]
    ckpt.close()


def test_a_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
    write_checkpoints(tmp_path, steps=(2,))
    ckpt = Checkpointer(tmp_path, save_every=2)
    other = {"w": jnp.zeros(8), "b": {"x": jnp.ones((4, 4))}}
    with pytest.raises(IncompatibleCheckpoint, match="has shape"):
        ckpt.restore_newest(abstract(other), iterator())
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_a_failed_save_names_the_path_and_free_space_and_leaves_no_partial_directory(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False)
    ckpt.save(1, STATE, None, {})
    # A real write error from the OS, as on a full disk: files may not grow past 1 KiB.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        with pytest.raises(OSError, match=r"saving checkpoint 2 under .*ckpt failed: .*GiB free"):
            ckpt.save(2, STATE, None, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
    ckpt.close()


def config(**changes):
    c = ml_collections.ConfigDict({"seed": 0, "learning_rate": 1e-3, "num_train_steps": 10,
                                   "allow_config_change": False,
                                   "data": {"global_batch_size": 8, "local_files": {"train": "a"}}})
    c.update_from_flattened_dict(changes)
    return c


def test_resuming_with_another_optimization_is_refused_unless_allowed():
    saved = config().to_dict()
    resume.check_config(saved, config(num_train_steps=20), 10)  # Extending a run is fine.
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 → 0.002; data.global_batch_size: "
                                         r"8 → 16.*allow_config_change=True"):
        resume.check_config(saved, config(learning_rate=2e-3, **{"data.global_batch_size": 16}), 10)
    resume.check_config(saved, config(seed=1, allow_config_change=True), 10)


def test_metric_lines_after_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.4},
             {"step": 3, "loss": 2.2}, {"step": 4, "eval_loss": 2.1}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
    from etils import epath

    assert resume.reconcile_metrics(epath.Path(path), 2) == {2}
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
