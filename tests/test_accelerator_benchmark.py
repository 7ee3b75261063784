"""benchmarks/accelerator.py: its CPU tiny mode end to end (equivalence checks, training MFU,
decoding, a profile trace), the XLA flags it and the GPU launch scripts set, and its trace
summary."""

import gzip
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.py"
MODELS = {"gpt2", "llama-1b"}


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # No 8 simulated devices.
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONDONTWRITEBYTECODE": "1",
            "XLA_FLAGS": FAST_COMPILE, **extra}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accelerator_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_mode_end_to_end(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", f"--out={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((out / "result.json").read_text()) == result
    assert (result["backend"], result["size"], result["devices"]) == ("cpu", "tiny", 1)

    # 1. Attention and models against the einsum reference: every mask, both dtypes.
    equivalence = result["equivalence"]
    assert equivalence["all_passed"], equivalence
    passed = {(c["impl"], c["dtype"], c["mask"]) for c in equivalence["attention"]
              if c["status"] == "pass"}
    assert {("xla", d, m) for d in ("float32", "bfloat16")
            for m in ("causal", "padded", "packed")} <= passed
    for check in equivalence["attention"]:
        assert set(check["errors"]) == {"out", "dq", "dk", "dv"}
    assert {(m["model"], m["dtype"]) for m in equivalence["model"]} == {
        (n, d) for n in MODELS for d in ("float32", "bfloat16")}
    for shapes in equivalence["attention_speed"].values():
        assert shapes["xla"]["fwd_bwd_ms"] > 0 and shapes["einsum"]["fwd_bwd_ms"] > 0

    # 2. Training: the recipes' numerics, positive throughput, an MFU that is a fraction.
    assert {r["model"] for r in result["train"]} == MODELS
    for row in result["train"]:
        assert "error" not in row, row
        assert (row["dtype"], row["param_dtype"]) == ("bfloat16", "float32")
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] <= 1
        assert math.isfinite(row["loss"])

    # 3. Decoding at batch 1 and 64.
    assert {(r["model"], r["batch"]) for r in result["decode"]} == {
        (n, b) for n in MODELS for b in (1, 64)}
    for row in result["decode"]:
        assert row["tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0

    # 4. One trace per model, written where asked, and its busiest ops.
    assert set(result["profile"]) == MODELS
    for profile in result["profile"].values():
        files = [pathlib.Path(f) for f in profile["trace_files"]]
        assert any(f.name.endswith(".xplane.pb") for f in files)
        assert all(f.is_file() and out in f.parents for f in files)
        assert profile["top"]["ops"] and profile["top"]["ops"][0]["ms"] > 0

    # The run-time path loads no CPU-only framework.
    assert result["cpu_only_modules_loaded"] == []


def test_xla_flags_are_known_to_the_pinned_jaxlib():
    """XLA aborts on an unknown flag: every flag the launch scripts and the A/B variants set."""
    variants = load_benchmark().flag_variants()
    assert variants["launch"] and variants["none"] == []
    flags = " ".join(sorted({f for v in variants.values() for f in v}))
    done = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                          capture_output=True, text=True, timeout=120,
                          env=child_env(XLA_FLAGS=flags))
    assert done.returncode == 0, done.stderr[-2000:]


def test_top_ops_counts_self_time_on_the_device(tmp_path):
    """Device ops by self time (a loop's body is not counted twice); host threads ignored."""
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Modules"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    spans = [(1, 7, "while.3", 0, 100), (1, 7, "gemm_fusion.1", 10, 60),
             (1, 7, "gemm_fusion.2", 70, 25), (1, 7, "loop_fusion", 120, 30),
             (1, 8, "jit_train_step", 0, 150), (2, 9, "python", 0, 500)]
    events = meta + [{"ph": "X", "pid": p, "tid": t, "name": n, "ts": ts, "dur": d}
                     for p, t, n, ts, d in spans]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    (folder / "host.trace.json.gz").write_bytes(gzip.compress(json.dumps(
        {"traceEvents": events}).encode()))
    top = load_benchmark().top_ops(tmp_path)
    assert top["source"] == "device" and top["total_ms"] == pytest.approx(0.13)
    assert [o["name"] for o in top["ops"]] == [
        "gemm_fusion.1", "loop_fusion", "gemm_fusion.2", "while.3"]
    assert [o["ms"] for o in top["ops"]] == pytest.approx([0.06, 0.03, 0.025, 0.015])
    assert top["kinds"][0] == {"kind": "gemm_fusion", "share": pytest.approx(85 / 130)}
