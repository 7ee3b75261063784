import pytest

from tests.hf.tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) → (HF folder, the torch model); each model is built once per session."""
    root = tmp_path_factory.mktemp("hf_tiny")
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_tiny(name, root)
        return made[name]

    return get
