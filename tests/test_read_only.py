"""A read-only checkout works: the demo and a CPU variant for every kind of recipe run from a copy
of the repository with no write permission, and write nothing into it (caches go to the user cache).
The notebooks run from the same kind of copy (tests/test_notebooks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import FAST_COMPILE

# A recipe's CPU variant for each way a run writes files, cut to a few steps: (recipe, overrides).
# The demo trains the tokenizer and builds a text dataset (as the other pretraining :tiny do); the
# fine-tuning recipes build their datasets through one local builder, which writes the same way
# whatever the reader (text_classification's CSV here; SQuAD's JSON, CoNLL and SemEval too);
# sft writes a chat template, a peft adapter and a merged model.
FEW_STEPS = {"num_train_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1}
RUNS = [
    ("configs/demo.py:ci", {}),
    ("configs/text_classification.py:ci", FEW_STEPS),
    ("configs/sft.py:ci", FEW_STEPS),
]
# Runs the recipes one after another in one interpreter, as `transformer.main` would.
DRIVER = """
import json, sys
from transformer.locations import enable_compilation_cache
from transformer.main import load_recipe
from transformer.train import run
enable_compilation_cache()
for i, (spec, overrides) in enumerate(json.loads(sys.argv[1])):
    config = load_recipe(spec)
    config.update_from_flattened_dict(overrides)
    run.run(config, f"{sys.argv[2]}-{i}")
    print("done", spec, flush=True)
"""


def test_recipes_run_from_a_read_only_checkout(read_only_repo, tmp_path):
    cache = tmp_path / "xdg_cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMER_CACHE", "XLA_FLAGS", "PYTHONPATH")}
    # No TRANSFORMER_CACHE: the default, under XDG_CACHE_HOME. Bytecode goes elsewhere too, as
    # for an installed package whose directory is not writable.
    env.update(XDG_CACHE_HOME=str(cache), PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"),
               PYTHONPATH=str(read_only_repo), JAX_PLATFORMS="cpu", TQDM_DISABLE="1",
               XLA_FLAGS=FAST_COMPILE)
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(RUNS), str(tmp_path / "run")], cwd=read_only_repo,
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("done ") == len(RUNS), result.stdout[-2000:]
    ours = cache / "transformer"
    assert (ours / "tokenizers" / "shakespeare_sp4096.model").is_file()
    assert any((ours / "datasets").iterdir())  # Prepared local datasets.
    assert any((ours / "jax").iterdir())  # Compiled programs.
    for i in range(len(RUNS)):
        assert (tmp_path / f"run-{i}" / "metrics.jsonl").is_file()
