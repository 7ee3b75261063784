"""SIGKILLs at the points where a run can lose or repeat work: during a save, during an
evaluation, between a metrics line and its checkpoint, at the final step. After the resumes, the
parameters, the data position and metrics.jsonl (timing fields aside) equal an uninterrupted
run's. A finished run whose final evaluation line is missing (a kill during that evaluation)
evaluates again on a rerun and writes that one line. (benchmarks/kill_campaign.py does the same
with 20+ random kills.)"""

from __future__ import annotations

import json

import numpy as np

from tests.train.test_main import (
    _leaves,
    assert_ok,
    data_state,
    final_params,
    main,
    start,
    tiny_args,
    wait_for,
)

STEPS = 12
RUN = {"num_train_steps": STEPS, "checkpoint_every": 3, "eval_every": 4, "eval_steps": 1}
TIMING = ("time", "_per_s", "mfu", "compile")  # Fields that differ between any two runs.


def rows(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def comparable(workdir):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows(workdir)]


def has_line(workdir, step, eval_line):
    return any(r["step"] == step and any(k.startswith("eval_") for k in r) == eval_line
               for r in rows(workdir))


def kill_when(workdir, fixtures, condition):
    process = start(tiny_args(fixtures, workdir, **RUN))
    wait_for(condition, process)
    process.kill()
    process.wait()


def test_kills_at_every_dangerous_point_change_nothing(fixtures, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(main(tiny_args(fixtures, straight, **RUN)))
    checkpoints = killed / "checkpoints"

    def saving():
        return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())

    kill_when(killed, fixtures, saving)
    kill_when(killed, fixtures, lambda: has_line(killed, 8, eval_line=False))  # Evaluating 8.
    kill_when(killed, fixtures, lambda: has_line(killed, 9, eval_line=False))  # Saving 9.
    kill_when(killed, fixtures, lambda: has_line(killed, STEPS, eval_line=False))  # The end.
    assert_ok(main(tiny_args(fixtures, killed, **RUN)))

    for (name, a), (other, b) in zip(sorted(_leaves(final_params(straight, STEPS))),
                                     sorted(_leaves(final_params(killed, STEPS)))):
        assert name == other
        np.testing.assert_array_equal(a, b)
    assert data_state(killed, STEPS) == data_state(straight, STEPS) != []
    assert comparable(killed) == comparable(straight)
    logged = [(r["step"], any(k.startswith("eval_") for k in r)) for r in rows(killed)]
    assert len(logged) == len(set(logged)) == STEPS + STEPS // 4  # One line each, none twice.

    # What a kill during the final evaluation leaves (checkpoint 12 saved, its eval line not
    # written), made exactly: the rerun of the finished run evaluates, writes that one line back.
    before = comparable(killed)
    path = killed / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    assert not has_line(killed, STEPS, eval_line=True)
    again = main(tiny_args(fixtures, killed, **RUN))
    assert_ok(again)
    assert f"finished at step {STEPS}:" in again.stdout and "eval_loss=" in again.stdout
    assert comparable(killed) == before
