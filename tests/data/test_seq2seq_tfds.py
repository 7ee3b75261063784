"""Seq2seq data from the TFDS catalog: a dataset registered and prepared offline (ArrayRecord, as
`tfds build` writes it) gives the same records, token ids and references as the same examples
read from the local JSONL file (in TFDS's order: it shuffles records by key when preparing)."""

import json

import pytest
import tensorflow_datasets as tfds

from tests.test_recipes import load
from transformer.data import seq2seq
from transformer.train import trainer


class DebianSynopses(tfds.core.GeneratorBasedBuilder):
    """The repository's Debian sample (tests/fixtures/debian) as a catalog dataset."""

    VERSION = tfds.core.Version("1.0.0")
    FILES: dict = {}

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"document": text, "summary": text}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in self.FILES.items()}

    def _generate_examples(self, path):
        with open(path) as f:
            for i, line in enumerate(f):
                row = json.loads(line)
                yield i, {"document": row["document"], "summary": row["summary"]}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    local = load("summarization").get_config("ci")
    local.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    DebianSynopses.FILES = {s: local.data.local_files[s] for s in ("train", "test")}
    data_dir = tmp_path_factory.mktemp("tfds")
    DebianSynopses(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    catalog = local.copy_and_resolve_references()
    catalog.data.dataset, catalog.data.data_dir = "debian_synopses", str(data_dir)
    return local, catalog


def test_catalog_records_equal_the_local_file(configs):
    local, catalog = configs
    for split in ("train", "test"):
        ours = seq2seq.read_records(catalog.data, catalog.seq2seq, split)
        reference = seq2seq.read_records(local.data, local.seq2seq, split)
        assert len(ours) == len(reference) > 0
        assert sorted((r["source"], r["target"]) for r in ours) == \
            sorted((r["source"], r["target"]) for r in reference)
        assert ours[0]["where"] == f"debian_synopses[{split}][0]"


def test_catalog_eval_examples_equal_the_local_file(configs):
    local, catalog = configs
    tokenizer = trainer.get_tokenizer(local)
    def examples(config):
        out = seq2seq.eval_examples(config, "test", tokenizer)
        assert out.inputs.shape == (20, config.data.max_length)
        return sorted((tuple(ids[:n]), tuple(refs)) for ids, n, refs in
                      zip(out.inputs.tolist(), out.lengths, out.references, strict=True))

    assert examples(catalog) == examples(local)


def test_missing_column_in_a_catalog_dataset_names_the_columns(configs):
    _, catalog = configs
    catalog = catalog.copy_and_resolve_references()
    catalog.seq2seq.target_key = "synopsis"
    with pytest.raises(ValueError, match=r"no column\(s\) \['synopsis'\]; the records have "
                                         r"\['document', 'summary'\]"):
        seq2seq.read_records(catalog.data, catalog.seq2seq, "test")
