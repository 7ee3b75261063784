"""Bad input is an error naming the problem and the fix, never a silent default or a raw crash:
one row per case, and the command lines end such errors with one `error: ...` line, status 2."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from transformer import model_io, score
from transformer.data import local_builder, readers, tasks
from transformer.data.sources import DataError, Report
from transformer.data.tokenizer import load_tokenizer
from transformer.inference import SamplingConfig
from transformer.main import load_recipe
from transformer.train import objectives, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    return load_tokenizer(fixtures / "tokenizers" / "encoder.json")


def demo(**changes):
    config = load_recipe("configs/demo.py:ci")
    config.update_from_flattened_dict(changes)
    return config


@pytest.mark.parametrize("changes, message", [
    ({"num_train_steps": -5}, "num_train_steps=-5 (must be at least 1)"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0 (must be >= 0)"),
    ({"data.global_batch_size": 0}, "data.global_batch_size=0 (must be at least 1)"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 (must be at least 1)"),
])
def test_config_values_no_run_can_use(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.check_values(demo(**changes))
    trainer.check_values(demo())  # The recipe itself passes.


def test_an_unknown_recipe_variant_is_refused():
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['bogus'\]; choose from \['ci'\]"):
        load_recipe("configs/demo.py:bogus")
    with pytest.raises(ValueError, match="unknown variant"):
        load_recipe("configs/text_classification.py:ci,tiny")


def test_csv_records_follow_the_csv_module_with_a_bom_and_multi_line_fields(tmp_path):
    text = 'text,label\n"two\nlines",pos\nplain,neg\n"say ""hi"", twice",pos\n5" tall,neg\n'
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's UTF-8 export starts with a BOM.
    ours = [{k: v for k, v in r.items() if k != "source"} for r in readers.read_records(path, "csv")]
    with open(path, encoding="utf-8-sig", newline="") as f:
        reference = list(csv.DictReader(f))
    assert ours == reference and len(ours) == 4
    assert [r["source"] for r in readers.read_records(path, "csv")] == [
        f"{path}:{n}" for n in (2, 4, 5, 6)]  # Each record names the line it starts on.


def _build(tmp_path, fmt, splits, on_error="raise"):
    files = {}
    for split, content in splits.items():
        files[split] = [str(tmp_path / f"{split}.{fmt}")]
        (tmp_path / f"{split}.{fmt}").write_text(content)
    return local_builder.build_local_dataset(fmt, files, cache_dir=tmp_path / "cache",
                                             on_error=on_error)


def _jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("bad, message", [
    ({"text": "b", "label": 1.5}, r"train.jsonl:2: field 'label' is 1.5 \(float\), but the column "
                                  r"holds int64"),
    ({"text": None, "label": 0}, r"train.jsonl:2: field 'text' is null"),
])
def test_jsonl_values_of_another_type_are_refused_not_cast(tmp_path, bad, message):
    with pytest.raises(DataError, match=message):
        _build(tmp_path, "jsonl", {"train": _jsonl({"text": "a", "label": 1}, bad)})


def test_skipped_bad_values_are_counted(tmp_path):
    build = _build(tmp_path, "jsonl", {"train": _jsonl({"text": "a", "label": 1},
                                                       {"text": "b", "label": 0.5},
                                                       {"text": "c", "label": 0})}, "skip")
    assert build.splits == {"train": 2}
    assert build.reports["train"].counts["bad_values"] == 1


def test_a_file_without_the_first_files_columns_is_named(tmp_path):
    with pytest.raises(DataError, match=r"validation.csv: columns \['label', 'text'\] differ from "
                                        r"those of .*train.csv: \['text'\]"):
        _build(tmp_path, "csv", {"train": "text\na\n", "validation": "text,label\nb,pos\n"})


@pytest.mark.parametrize("example, message", [
    ({"review": "good", "label": "pos", "source": "f.csv:2"},
     r"f.csv:2: no column 'sentence' \(finetune.text_keys\); the records have \['label', "
     r"'review'\]"),
    ({"sentence": "good", "source": "f.csv:3"},
     r"f.csv:3: no column 'label' \(finetune.label_key\)"),
    ({"sentence": "  ", "label": "pos", "source": "f.csv:4"},
     r"f.csv:4: empty text in column 'sentence'"),
])
def test_task_records_missing_a_column_or_text(tokenizer, example, message):
    task = tasks.Task("bad_input_task", "classification", ("neg", "pos"), "accuracy",
                      text_keys=("sentence",))
    with pytest.raises(DataError, match=message):
        tasks.Preprocessor(task, tokenizer, max_length=16)(example)
    report = Report()
    assert tasks.Preprocessor(task, tokenizer, max_length=16, on_error="skip",
                              report=report)(example) == []
    assert sum(report.counts.values()) == 1  # Skipped, and counted.


def test_a_train_split_smaller_than_one_batch_is_refused(fixtures, tokenizer, tmp_path):
    config = load_recipe("configs/text_classification.py:ci")
    rows = (fixtures / "sst2" / "train.tsv").read_text().splitlines()[:4]  # Header + 3 rows.
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    config.data.local_files.train = str(tmp_path / "train.tsv")
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.global_batch_size = 8
    objective = objectives.get_objective(config.objective)
    with pytest.raises(ValueError, match="split 'train' holds 3 records for this process, fewer "
                                         "than its batch of 8"):
        next(objective.train_data(config, tokenizer, 0, 1))


def test_greedy_decoding_refuses_sampling_options():
    with pytest.raises(ValueError, match="no effect with temperature=0"):
        SamplingConfig(temperature=0.0, top_k=5)
    SamplingConfig(temperature=0.7, top_k=5)


def test_an_empty_text_is_not_scored():
    with pytest.raises(ValueError, match="text 2 is empty"):
        score.read_texts(["fine", ""], None)


def test_a_hugging_face_folder_where_ours_is_expected_names_the_conversion(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="is a Hugging Face folder.*transformer.convert import"):
        model_io.read_config(tmp_path)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from safetensors.numpy import save_file

    from transformer.hf.safetensors_io import SafetensorsReader

    save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model/model.safetensors: not a readable safetensors "
                                         r"file .*truncated"):
        SafetensorsReader(tmp_path / "model").read("w")


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_command_lines_end_a_user_error_with_one_line(tmp_path):
    result = _cli("transformer.main", "--config=configs/demo.py:ci", f"--workdir={tmp_path / 'w'}",
                  "--config.num_train_steps=-5")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: bad config value(s): num_train_steps=-5 (must be at least "
                                "1)"), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
