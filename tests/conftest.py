"""Test harness: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run: LLVM's optimizations of the CPU code take a third of the
# suite's CPU time and change no result (XLA:CPU does not reorder float arithmetic either way).
# Child processes the tests start get it too (FAST_COMPILE).
FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
# The tests read only the repository: no full dataset folder, even where one sits beside the checkout.
os.environ["TRANSFORMER_DATA"] = str(pathlib.Path(tempfile.gettempdir()) / "transformer-tests-no-data")
# A cache of the test runs' own (trained tokenizers, prepared datasets), shared by the workers.
TEST_CACHE = pathlib.Path(tempfile.gettempdir()) / f"transformer-tests-cache-{os.getuid()}"
os.environ.setdefault("TRANSFORMER_CACHE", str(TEST_CACHE))
# Compiled programs go to the persistent cache under it, as the command lines' do: the tests build
# the same tiny models again and again, and each program is compiled once per run, not per test.
from transformer.locations import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
    """Small samples of the real datasets and tokenizer files (tests/fixtures/, see its README)."""
    return FIXTURES


REPO = FIXTURES.parents[1]
NOT_COPIED = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture(scope="session")
def read_only_repo(tmp_path_factory):
    """A copy of the checkout without write permission; at the end, checked to be unchanged
    (root may write anyway, so the check is what proves it)."""
    copy = tmp_path_factory.mktemp("checkout") / "repo"
    shutil.copytree(REPO, copy, ignore=lambda _, names: [n for n in names if n in NOT_COPIED])
    for path in [copy, *copy.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(copy)
    yield copy
    after = _snapshot(copy)
    for path in [copy, *copy.rglob("*")]:  # Let pytest clean it up.
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert after == before, f"written into the checkout: {sorted(set(after) ^ set(before))}"
