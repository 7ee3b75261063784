"""A read-only checkout works: the demo and every recipe's CPU variant run from a copy of the
repository with no write permission, and write nothing into it (caches go to the user cache).
The notebooks run from the same kind of copy (tests/test_notebooks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Each recipe's CPU variant, cut to a few steps: (config, overrides).
RUNS = [
    ("configs/demo.py:ci", []),
    ("configs/gpt2_pretrain.py:tiny", ["--config.num_train_steps=2", "--config.eval_steps=1",
                                       "--config.model.num_layers=1"]),
    ("configs/llama_pretrain.py:tiny", ["--config.num_train_steps=2", "--config.eval_steps=1",
                                        "--config.model.num_layers=1"]),
    ("configs/bert_pretrain.py:tiny", ["--config.num_train_steps=2", "--config.eval_steps=1",
                                       "--config.model.num_layers=1"]),
    ("configs/glue.py:sst2,ci", ["--config.num_train_steps=2"]),
    ("configs/ner.py:ci", ["--config.num_train_steps=2"]),
    ("configs/squad.py:ci", ["--config.num_train_steps=2"]),
    ("configs/relation.py:ci", ["--config.num_train_steps=2"]),
    ("configs/text_classification.py:ci", ["--config.num_train_steps=2"]),
]
# Runs the recipes one after another in one interpreter (absl flags are parsed once per process).
DRIVER = """
import sys
from absl import flags
from ml_collections import config_flags
from transformer.locations import enable_compilation_cache
from transformer.train import run
enable_compilation_cache()
import json
for i, args in enumerate(json.loads(sys.argv[1])):
    holder = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=holder)
    holder(["driver", f"--config={args[0]}", *args[1]])
    overrides = {"eval_every": 2, "checkpoint_every": 2, "log_every": 1}
    for key, value in overrides.items():
        if not any(a.startswith(f"--config.{key}=") for a in args[1]):
            config.value[key] = value
    run.run(config.value, f"{sys.argv[2]}/run{i}")
    print("done", args[0], flush=True)
"""


def test_recipes_run_from_a_read_only_checkout(read_only_repo, tmp_path):
    cache = tmp_path / "xdg_cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMER_CACHE", "XLA_FLAGS", "PYTHONPATH")}
    # No TRANSFORMER_CACHE: the default, under XDG_CACHE_HOME. Bytecode goes elsewhere too, as
    # for an installed package whose directory is not writable.
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"),
               PYTHONPATH=str(read_only_repo), JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(RUNS), str(tmp_path / "runs")], cwd=read_only_repo,
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("done ") == len(RUNS), result.stdout[-2000:]
    ours = cache / "transformer"
    assert (ours / "tokenizers" / "shakespeare_sp4096.model").is_file()
    assert any((ours / "datasets").iterdir())  # Prepared local datasets.
    assert any((ours / "jax").iterdir())  # Compiled programs.
    for i in range(len(RUNS)):
        assert (tmp_path / "runs" / f"run{i}" / "metrics.jsonl").is_file()
