"""The tiny Hugging Face reference models, shared with tests/hf."""

from tests.hf.conftest import tiny  # noqa: F401
