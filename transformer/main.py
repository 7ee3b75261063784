"""The command line: `python -m transformer.main --config=configs/<recipe>.py[:variant] --workdir=DIR`.

Any config field can be overridden, e.g. `--config.num_train_steps=100 --config.model.num_layers=2`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from transformer import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py:ci")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def check_overrides(argv: list[str], config) -> None:
    """Fail at once on an override of a field the recipe does not have, naming close ones."""
    known = set(_flatten_keys(config.to_dict()))
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=5, cutoff=0.6)
            raise app.UsageError(
                f"unknown config field {key!r}; close fields: {close or 'none'}"
            )


def _flatten_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, prefix + k + "."))
    return keys


def main(argv: list[str]) -> None:
    del argv
    from transformer.locations import enable_compilation_cache
    from transformer.train import run

    enable_compilation_cache()
    run.run(_CONFIG.value, _WORKDIR.value)


def load_recipe(spec: str):
    """The ConfigDict of `path.py[:variant]`, loaded the way the --config flag will load it."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("recipe", path)
    if module_spec is None or not os.path.isfile(path):
        raise app.UsageError(f"--config: no recipe file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def entry() -> None:
    # Check override keys before ml_collections parses them, for an error without a traceback.
    spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None)
    if spec:
        try:
            check_overrides(sys.argv[1:], load_recipe(spec))
        except cli.USER_ERRORS as error:
            cli.fail(error)
    cli.run(main)


if __name__ == "__main__":
    entry()
