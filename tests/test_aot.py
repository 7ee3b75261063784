"""`python -m transformer.aot`: topology names, the memory report of a real libtpu compile for
v5e 2x2 (equal to the analytic parameter + AdamW bytes per device), the does-not-fit exit, the
message when libtpu is missing, and the search for the smallest change that fits (its logic on a
stand-in compiler; a real batch too big for v5e 2x2, and the suggestion the search compiles). The
compiles run in subprocesses: libtpu's environment (TPU_ACCELERATOR_TYPE, ...) never reaches this
CPU test process."""

import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from transformer import aot
from transformer.aot_memory import GIB, parse_topology
from transformer.aot_search import Search, format_overrides

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


# -- the search for a change that fits ------------------------------------------------------------

def fake_measure(config, gib_per_row, state_gib, hbm_gib=16):
    """A stand-in compiler: the peak is the state (sharded over fsdp) + a cost per row a device
    holds at a time (less with a stronger remat policy)."""
    remat_share = {"none": 1.0, "dots": 0.6, "dots_no_batch": 0.5, "full": 0.3}
    calls = []

    def measure(overrides):
        calls.append(overrides)
        c = copy.deepcopy(config)
        aot.apply_overrides(c, format_overrides(overrides))
        shards = 4 if c.mesh.fsdp == -1 else c.mesh.fsdp
        data_parallel = 4 if c.mesh.data == -1 else c.mesh.data * shards
        if c.data.global_batch_size % (data_parallel * c.grad_accum_steps):
            return None
        rows = c.data.global_batch_size // data_parallel // c.grad_accum_steps
        state = state_gib / shards * GIB
        peak = state + rows * gib_per_row * remat_share[c.model.remat_policy] * GIB
        return {"rows_per_device": rows, "total_bytes": peak, "fits": peak <= hbm_gib * GIB,
                "params_bytes": state / 3, "optimizer_bytes": 2 * state / 3, "batch_bytes": 0,
                "hbm_bytes": hbm_gib * GIB, "global_batch_size": c.data.global_batch_size}

    return measure, calls


def tiny_config(**fields):
    from transformer.train.config import base_config

    config = base_config("llama-tiny")
    config.data.global_batch_size = 256
    config.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    aot.apply_overrides(config, [f"--config.{k}={v}" for k, v in fields.items()])
    return config


def test_search_finds_the_fewest_microbatches_that_fit():
    config = tiny_config()  # 64 rows per device; 0.5 GiB a row: 16 rows fit 16 GiB, 32 do not.
    measure, calls = fake_measure(config, gib_per_row=0.5, state_gib=4)
    search = Search(config, measure({}), measure, log=lambda line: None)
    suggestion = search.run()
    assert suggestion["overrides"] == ["--config.grad_accum_steps=4"]
    assert not suggestion["changes_training"]
    tried = {tuple(t["overrides"]): t["fits"] for t in search.tried}
    assert tried[("--config.grad_accum_steps=2",)] is False  # Checked: 4 is the fewest.
    assert len(search.tried) <= 3


def test_search_tries_remat_once_accumulation_runs_out():
    # 2 rows per device at 10 GiB a row without remat: one row does not fit, full remat does.
    config = tiny_config(**{"data.global_batch_size": 8, "model.remat_policy": "none"})
    measure, _ = fake_measure(config, gib_per_row=20, state_gib=2)
    search = Search(config, measure({}), measure, log=lambda line: None)
    suggestion = search.run()
    assert suggestion["overrides"][0] == "--config.model.remat_policy=dots"
    assert suggestion["fits"] and len(search.tried) <= 8


def test_search_shards_a_state_that_does_not_fit_over_fsdp():
    # 40 GiB of state replicated over 4 data-parallel chips: only more FSDP helps.
    config = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 1})
    measure, _ = fake_measure(config, gib_per_row=0.01, state_gib=40)
    search = Search(config, measure({}), measure, log=lambda line: None)
    suggestion = search.run()
    assert suggestion["overrides"] == ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    assert not any("grad_accum" in " ".join(t["overrides"]) for t in search.tried)


def test_search_stays_within_its_compile_budget():
    config = tiny_config()
    measure, calls = fake_measure(config, gib_per_row=100, state_gib=400)  # Nothing fits.
    search = Search(config, measure({}), measure, max_compiles=3, log=lambda line: None)
    assert search.run() is None
    assert len(search.tried) <= 3 and len(calls) <= 4


# A one-layer Llama whose 1M-entry vocabulary makes 4 rows of 1024 tokens per chip too big for
# v5e's 16 GiB (the float32 logits), though the model is small: a fast compile either way.
CI_CASE = ["--preset=llama-tiny", "--config.model.hidden_size=128", "--config.model.num_layers=1",
           "--config.model.num_heads=1", "--config.model.num_kv_heads=1",
           "--config.model.mlp_dim=256", "--config.model.vocab_size=1048576",
           "--config.data.max_length=1024", "--per_device_batch=4", "--topology=v5e:2x2"]


@needs_libtpu
def test_a_batch_too_big_gets_a_suggestion_that_fits():
    result = run_aot(*CI_CASE, "--json")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "does not fit" in result.stdout and "suggestion: --config." in result.stdout
    suggestion = json.loads(result.stdout.strip().splitlines()[-1])["suggestion"]
    # The search compiled the suggestion itself: its peak is a compiled program's, and fits.
    assert suggestion["fits"] and suggestion["overrides"]
    assert 0 < suggestion["peak_bytes"] <= 16 * 2**30  # v5e: 16 GiB per chip.


def test_each_pretraining_recipe_names_its_slice_and_scaling_md_has_its_measured_peak():
    # The fit of each documented command is measured by `transformer.aot` (minutes a compile);
    # this checks that the recipes name their check and that docs/scaling.md records its result.
    import re

    table = (REPO / "docs" / "scaling.md").read_text()
    for recipe in ("bert_pretrain", "gpt2_pretrain", "llama_pretrain", "moe_pretrain"):
        text = (REPO / "configs" / f"{recipe}.py").read_text()
        commands = re.findall(r"python -m transformer\.aot (--config=\S+ --topology=\S+)", text)
        assert commands, f"configs/{recipe}.py names no `transformer.aot` check"
        for command in commands:
            row = next((line for line in table.splitlines() if f"`{command}`" in line), None)
            assert row is not None and row.rstrip().endswith("| yes |"), (recipe, command)
