"""Where full datasets are read from and where caches are written: never into the source tree.

- Datasets: `$TRANSFORMER_DATA` (default: `shared/data` beside the repository checkout), holding
  `sst2/`, `ner/`, `squad/`, `relation/`, `translation/`, ... as recipes, benchmarks and notebooks
  name them. A missing one fails at once with `missing_dataset`, which says what to put where.
- Samples: `tests/fixtures/` of the checkout, small slices of the same datasets with their
  licences, for the `:ci` recipe variants, the tests and notebooks on a fresh clone.
- Caches (trained tokenizers, prepared datasets, compiled XLA programs): `$TRANSFORMER_CACHE`, else
  `$XDG_CACHE_HOME/transformer`, else `~/.cache/transformer`.
"""

from __future__ import annotations

import os
import pathlib

DATA_ENV = "TRANSFORMER_DATA"
CACHE_ENV = "TRANSFORMER_CACHE"
REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "fixtures"


def data_dir() -> pathlib.Path:
    """The folder of full datasets: `$TRANSFORMER_DATA`, or `shared/data` beside the checkout."""
    configured = os.environ.get(DATA_ENV)
    return pathlib.Path(configured).expanduser() if configured else REPO.parent / "shared" / "data"


def dataset(*parts: str) -> pathlib.Path:
    """A path under the data folder, e.g. `dataset("sst2", "train.tsv")` (not checked here: a
    config may name files that are only read later, on another machine)."""
    return data_dir().joinpath(*parts)


def sample(*parts: str) -> pathlib.Path:
    """A path under the repository's small dataset samples (tests/fixtures/)."""
    return SAMPLES.joinpath(*parts)


def have_dataset(*parts: str) -> bool:
    return dataset(*parts).exists()


def cache_dir(*parts: str) -> pathlib.Path:
    """A folder under the user cache directory (created): see the module docstring."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "transformer")
    path = pathlib.Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_dataset(path: str | os.PathLike) -> FileNotFoundError:
    """The error for a data file that does not exist; under the data folder it says how to fix it."""
    path = pathlib.Path(path)
    root = data_dir()
    if not path.is_relative_to(root):
        return FileNotFoundError(f"data file {path} does not exist")
    relative = path.relative_to(root)
    return FileNotFoundError(
        f"data file {path} does not exist: full datasets are read from ${DATA_ENV} (now {root}). "
        f"Put the {relative.parts[0]}/ folder there (docs/data.md says where each dataset comes "
        f"from), or set {DATA_ENV}=/path/to/data holding {relative}; the :ci recipe variants use "
        f"the repository's samples in {SAMPLES} instead.")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache under the user cache (`cache_dir("jax")`), so a rerun of
    a command loads its compiled programs instead of compiling them again. A cache directory the
    user set (JAX_COMPILATION_CACHE_DIR) is kept."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir("jax")))
    # Every program, however quick to compile: a command compiles dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
