"""Two processes on 127.0.0.1 (4 CPU devices each, gloo collectives) train together through
`python -m transformer.main`: the same losses as one process with 8 devices, checkpoints that
restore across process counts, and a clear error when the coordinator cannot be reached.

The corpus is built so that both layouts see the same global batches: every document fills
exactly one packed row, and the documents are ordered so that process 0's half and process 1's
half of the file, batch by batch, give the rows one process reads from the whole file.
"""

import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
T = 32  # Tokens per row (= per document).
BATCH = 8  # Global batch; 4 rows per process with two processes.
TIMEOUT = 240  # Seconds a run may take before the test fails (instead of hanging).
WORDS = [  # Each one piece of the 256-piece SentencePiece fixture (after a space, too).
    "the", "you", "and", "not", "that", "for", "his", "him", "have", "with", "your", "her",
    "this", "will", "thou", "but", "shall", "our", "know", "all", "sir", "lord", "good", "what",
    "was", "would", "from", "well", "which", "love", "more", "make", "see", "come", "great", "say",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixtures):
    """The corpus and the overrides every run shares."""
    from transformer.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("multiprocess")
    tokenizer_path = fixtures / "tokenizers" / "shakespeare_sp256.model"
    tokenizer = load_tokenizer(tokenizer_path)
    rng = np.random.default_rng(0)

    def document() -> str:  # T tokens with the BOS and EOS the pipeline adds.
        words = list(rng.choice(WORDS, T - 2))
        text = " ".join(words)
        assert len(tokenizer.encode(text)) == T - 2, "every word must be one token"
        return text

    blocks = {name: [document() for _ in range(BATCH // 2)] for name in "ABCD"}
    # Rows of step i: one process reads blocks 2i, 2i+1; two processes read blocks i and 4+i.
    # With blocks A B B C | B C C D both give [A,B], [B,C], [B,C], [C,D]; then the data wraps.
    order = "ABBCBCCD"
    (root / "train.txt").write_text("\n\n".join(d for b in order for d in blocks[b]) + "\n")
    (root / "validation.txt").write_text("\n\n".join(blocks["A"]) + "\n")
    overrides = [
        f"--config.data.tokenizer={tokenizer_path}", "--config.model.vocab_size=256",
        "--config.tokenizer_training.files=",
        f"--config.data.local_files.train={root / 'train.txt'}",
        f"--config.data.local_files.validation={root / 'validation.txt'}",
        f"--config.data.cache_dir={root / 'cache'}", "--config.data.shuffle=False",
        f"--config.data.max_length={T}", f"--config.model.max_length={T}",
        f"--config.data.global_batch_size={BATCH}",
        "--config.model.hidden_size=64", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.mlp_dim=128",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.schedule=constant", "--config.warmup_steps=0", "--config.learning_rate=1e-2",
        "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=4",
        "--config.async_checkpointing=False",
    ]
    return root, overrides


def launch(workdir, overrides, steps, process_id=None, num_processes=1, devices=8,
           extra=(), env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
           **(env_extra or {})}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if env_extra is None or key not in env_extra:
            env.pop(key, None)
    args = [sys.executable, "-m", "transformer.main", "--config=configs/demo.py:ci",
            f"--workdir={workdir}", *overrides, f"--config.num_train_steps={steps}", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(*procs) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"run did not finish within {TIMEOUT}s")
        outputs.append(out)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return outputs


def one_process(workdir, overrides, steps):
    return finish(launch(workdir, overrides, steps))[0]


def two_processes(workdir, overrides, steps, via_env=False):
    """Coordinator address and process ids from --config.distributed.* flags, or from the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        if via_env:
            env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(i)}
            procs.append(launch(workdir, overrides, steps, devices=4, env_extra=env))
        else:
            flags = [f"--config.distributed.coordinator_address={address}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
            procs.append(launch(workdir, overrides, steps, devices=4, extra=flags))
    return finish(*procs)


def losses(workdir) -> dict[int, tuple[float, float]]:
    lines = (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in lines if "loss" in m}


@pytest.fixture(scope="module")
def runs(setup):
    """One process to step 4 (and resumed to 6); two processes to step 4."""
    root, overrides = setup
    one, two = root / "one", root / "two"
    one_process(one, overrides, 4)  # Also builds the dataset cache the later runs share.
    one_four = losses(one)
    two_processes(two, overrides, 4)
    one_process(one, overrides, 6)
    return root, overrides, one_four, losses(one), losses(two)


def test_two_processes_match_one_process(runs):
    _, _, one_four, _, two = runs
    assert {1, 2, 3} <= set(one_four) and sorted(two) == sorted(one_four)
    for step in one_four:
        np.testing.assert_allclose(two[step], one_four[step], rtol=1e-6, err_msg=f"step {step}")
    assert one_four[3][0] < one_four[1][0]  # It trains.


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    root, overrides, _, one_six, _ = runs
    workdir = root / "two_to_one"
    shutil.copytree(root / "two", workdir)
    out = one_process(workdir, overrides, 6)
    assert "finished at step 6" in out
    resumed = losses(workdir)
    # The data wrapped at step 4 and restarts here: the same rows and the same restored state
    # give the same step-5 loss as the one-process run.
    np.testing.assert_allclose(resumed[5], one_six[5], rtol=1e-6)
    assert math.isfinite(resumed[5][0])


def test_checkpoint_of_one_process_resumes_in_two(runs):
    root, overrides, _, one_six, _ = runs
    workdir = root / "one_to_two"
    shutil.copytree(root / "one", workdir, ignore=lambda d, names: [
        n for n in names if n == "6" or n == "metrics.jsonl"])
    two_processes(workdir, overrides, 6, via_env=True)
    np.testing.assert_allclose(losses(workdir)[5], one_six[5], rtol=1e-6)


def test_unreachable_coordinator_fails_within_timeout(setup):
    root, overrides = setup
    timeout = 3
    start = time.monotonic()
    proc = launch(root / "orphan", overrides, 2, devices=4, extra=[
        f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
        "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
        f"--config.distributed.initialization_timeout={timeout}"])
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, out[-3000:]  # A Python error, not the runtime's SIGABRT (-6).
    assert "coordinator 127.0.0.1:" in out and "not reachable after 3s" in out
    assert elapsed < timeout + 60  # Start-up (imports) plus the timeout; never a hang.
