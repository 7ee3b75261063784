"""`python -m transformer.aot`: topology names, the memory report of a real libtpu compile for
v5e 2x2 (equal to the analytic parameter + AdamW bytes per device), the does-not-fit exit, and
the message when libtpu is missing. The compiles run in subprocesses: libtpu's environment
(TPU_ACCELERATOR_TYPE, ...) never reaches this CPU test process."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from transformer import aot
from transformer.aot_memory import parse_topology

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason=f"libtpu is not installed ({aot.LIBTPU_INSTALL})")


def run_aot(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "transformer.aot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("spec, grid, accelerator, hosts_bounds", [
    ("v5p-256", "v5p:4x4x8", "v5p-256", (2, 2, 1)),
    ("v5p-8", "v5p:2x2x1", "v5p-8", (2, 2, 1)),
    ("v5p-64", "v5p:2x4x4", "v5p-64", (2, 2, 1)),
    ("v4-32", "v4:2x2x4", "v4-32", (2, 2, 1)),
    ("v5litepod-16", "v5e:4x4", "v5litepod-16", (2, 2, 1)),
    ("v5e-256", "v5e:16x16", "v5litepod-256", (2, 2, 1)),
    ("v6e-8", "v6e:2x4", "v6e-8", (2, 2, 1)),
    ("v5e:2x2", "v5e:2x2", "v5litepod-4", (2, 2, 1)),
    ("v5e-1", "v5e:1x1", "v5litepod-1", (1, 1, 1)),
    ("v5p:4x4x6", "v5p:4x4x6", "v5p-192", (2, 2, 1)),
])
def test_topology_names(spec, grid, accelerator, hosts_bounds):
    topology = parse_topology(spec)
    assert (topology.name, topology.accelerator_type) == (grid, accelerator)
    assert topology.chips_per_host_bounds == hosts_bounds


@pytest.mark.parametrize("spec", ["v5p-100", "v5p-4", "v7-8", "v5e-12", "v5e:2x2x2", "tpu", "v4:2x2"])
def test_bad_topology_names(spec):
    with pytest.raises(ValueError, match="topology"):
        parse_topology(spec)


def test_bad_topology_exits_2_without_compiling():
    result = run_aot("--preset=gpt2", "--topology=v5p-100", timeout=120)
    assert result.returncode == 2 and "power of two" in result.stderr


def test_missing_libtpu_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install libtpu==0\.0\.42\.1"):
        aot.topology_devices(parse_topology("v5e:2x2"))


TINY = ["--preset=llama-tiny", "--config.model.hidden_size=512", "--config.model.num_layers=8",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=4",
        "--config.model.mlp_dim=1024", "--config.model.vocab_size=1024",
        "--config.data.max_length=128", "--config.data.global_batch_size=8"]


@needs_libtpu
def test_tiny_model_on_v5e_2x2_matches_analytic_state_bytes():
    # head_dim 128 and widths that are multiples of 128 × 4 devices: TPU tiles add no padding.
    result = run_aot(*TINY, "--topology=v5e:2x2", "--json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fits" in result.stdout and "v5e:2x2" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    params, shards = report["params"], 4  # The default mesh: fsdp over all 4 chips.
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    analytic_params = 4 * params / shards  # float32
    analytic_adam = 2 * analytic_params  # AdamW's two moments, sharded like the parameters.
    assert report["params_bytes"] == pytest.approx(analytic_params, rel=1e-3)
    assert report["optimizer_bytes"] == pytest.approx(analytic_adam, rel=1e-3)
    # What the TPU compiler allocates for the (donated) state and batch arguments.
    assert report["argument_bytes"] == pytest.approx(analytic_params + analytic_adam, rel=0.03)
    assert report["argument_bytes"] <= report["total_bytes"] <= report["hbm_bytes"]
    assert report["fits"] is True


@needs_libtpu
def test_does_not_fit_exits_1():
    # ~4B parameters (a huge vocabulary) on one 16 GiB v5e chip: the compiler runs out of HBM.
    result = run_aot(*TINY[:-3], "--config.model.vocab_size=4000000", "--config.model.num_layers=2",
                     "--config.data.max_length=128", "--config.data.global_batch_size=8",
                     "--topology=v5e:1x1", "--json")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "does not fit" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["fits"] is False
