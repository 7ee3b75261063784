"""The command line end to end, in fresh processes: preemption, the demo, errors. (Resumes after
kills: tests/train/test_kill_campaign.py.)"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import FAST_COMPILE
from transformer.train.checkpointing import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[2]
# 256 SentencePiece pieces: a small vocabulary keeps the logits and the checkpoints small.
TINY_TOKENIZER = "shakespeare_sp256.model"


def tiny_args(fixtures, workdir, **overrides):
    corpus = REPO / "data" / "shakespeare" / "validation.txt.gz"
    values = {
        "model.vocab_size": 256, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_heads": 4, "model.mlp_dim": 64, "model.max_length": 32,
        "data.tokenizer": fixtures / "tokenizers" / TINY_TOKENIZER,
        "tokenizer_training.files": "", "data.max_length": 32, "data.global_batch_size": 8,
        "data.local_files.train": corpus, "data.local_files.validation": corpus,
        "data.cache_dir": workdir.parent / "data_cache",
        "schedule": "constant", "warmup_steps": 2, "log_every": 1, "eval_every": 0,
        "samples.prompts": "()",
    }
    values.update(overrides)
    return ["--config=configs/demo.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def main(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "transformer.main", *map(str, args)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=600, **kwargs)


def start(args):
    return subprocess.Popen([sys.executable, "-m", "transformer.main", *map(str, args)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def final_params(workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1)
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return state["state"]["params"]


def data_state(workdir, step):
    files = sorted((workdir / "checkpoints" / str(step) / "data").glob("*"))
    return [f.read_text() for f in files if f.suffix == ".json"]


def losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield (prefix + k, np.asarray(v))


def wait_for(predicate, process, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"process ended early:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.005)
    raise TimeoutError("condition not reached")


def test_sigterm_saves_a_checkpoint_and_exits_75_without_exporting(fixtures, tmp_path):
    workdir = tmp_path / "run"
    process = start(tiny_args(fixtures, workdir, num_train_steps=100000,
                              checkpoint_every=100000))
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in output
    assert "preempted at step" in output and "finished at step" not in output
    assert not (workdir / "model").exists()  # A preempted run exports nothing.
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1)
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and step >= 3
    result = main(tiny_args(fixtures, workdir, num_train_steps=step + 2, checkpoint_every=1000))
    assert_ok(result)
    assert max(losses(workdir)) == step + 2


def test_demo_recipe_runs_end_to_end(tmp_path):
    result = main(["--config=configs/demo.py:ci", f"--workdir={tmp_path / 'demo'}"])
    assert_ok(result)
    rows = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) >= 3 and train[-1] < train[0]
    assert any("eval_loss" in r for r in rows)
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "demo" / "tensorboard").glob("events.out.tfevents.*"))
    assert "finished at step 8" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.num_train_step=3"], "unknown config field 'num_train_step'; close fields: "
                                        "['num_train_steps'"),
        (["--config.model.hiden_size=3"], "close fields: ['model.hidden_size'"),
    ],
)
def test_unknown_override_fails_at_once_with_close_keys(tmp_path, args, message):
    result = main(["--config=configs/demo.py", f"--workdir={tmp_path}", *args])
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_workdir_and_batch_fail_with_clear_errors(fixtures, tmp_path):
    missing_parent = tmp_path / "no" / "such" / "dir"
    result = main(tiny_args(fixtures, missing_parent))
    assert result.returncode != 0 and "its parent" in result.stderr and "does not exist" in result.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = main(tiny_args(fixtures, a_file))
    assert result.returncode != 0 and "is not a directory" in result.stderr
    result = main(tiny_args(fixtures, tmp_path / "w", **{"data.global_batch_size": 12}))
    assert result.returncode != 0
    assert "not divisible by data-parallel size 8" in result.stderr
    result = main(tiny_args(fixtures, tmp_path / "w", **{"mesh.data": 3}))
    assert result.returncode != 0 and "not divisible by 3" in result.stderr


def test_checkpoint_of_another_model_shape_is_refused(fixtures, tmp_path):
    workdir = tmp_path / "run"
    assert_ok(main(tiny_args(fixtures, workdir, num_train_steps=2, checkpoint_every=2)))
    result = main(tiny_args(fixtures, workdir, num_train_steps=4, **{"model.mlp_dim": 48}))
    assert result.returncode != 0
    assert "has shape (2, 64) but this model needs (2, 48)" in result.stderr
