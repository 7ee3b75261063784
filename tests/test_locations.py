"""Where datasets are read and caches written: one variable each, and a missing dataset fails at
once saying what to put where."""

import pathlib

import pytest

from tests.finetune.conftest import load_recipe
from transformer import locations
from transformer.train import run


def test_data_dir_and_cache_dir_follow_their_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_DATA", str(tmp_path / "data"))
    assert locations.dataset("sst2", "train.tsv") == tmp_path / "data" / "sst2" / "train.tsv"
    monkeypatch.delenv("TRANSFORMER_DATA")
    assert locations.data_dir() == locations.REPO.parent / "shared" / "data"

    monkeypatch.delenv("TRANSFORMER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert locations.cache_dir("jax") == tmp_path / "xdg" / "transformer" / "jax"
    assert (tmp_path / "xdg" / "transformer" / "jax").is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert locations.cache_dir() == tmp_path / "home" / ".cache" / "transformer"
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path / "mine"))
    assert locations.cache_dir("datasets") == tmp_path / "mine" / "datasets"


def test_recipes_read_the_data_folder_and_ci_variants_the_samples(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_DATA", str(tmp_path))
    for recipe, variant, split in (("glue", "sst2", "train"), ("ner", "conll2003", "train"),
                                   ("squad", "squad", "validation"), ("relation", "semeval", "test"),
                                   ("text_classification", "base", "train")):
        full = pathlib.Path(load_recipe(recipe, variant).data.local_files[split])
        assert full.is_relative_to(tmp_path), (recipe, full)
        sample = pathlib.Path(load_recipe(recipe, "ci").data.local_files[split])
        assert sample.is_relative_to(locations.SAMPLES) and sample.is_file(), (recipe, sample)


def test_a_missing_dataset_names_the_variable_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_DATA", str(tmp_path / "data"))
    config = load_recipe("glue", "sst2,ci")  # The tiny model, with the full dataset's files:
    full = load_recipe("glue", "sst2").data.local_files
    config.data.local_files.train, config.data.local_files.validation = full.train, full.validation
    with pytest.raises(FileNotFoundError) as error:
        run.run(config, str(tmp_path / "workdir"))
    message = str(error.value)
    assert "TRANSFORMER_DATA" in message and str(tmp_path / "data" / "sst2" / "train.tsv") in message
    assert "Put the sst2/ folder there" in message and "tests/fixtures" in message


def test_the_bundled_corpus_caches_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_CACHE", str(tmp_path / "cache"))
    config = load_recipe("demo", "")
    assert pathlib.Path(config.data.tokenizer).is_relative_to(tmp_path / "cache")
    assert config.data.cache_dir == ""  # The datasets cache, under the same root.
