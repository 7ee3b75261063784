"""The recipes' training batches, packed: the same examples in the same order as padded ones."""

import itertools

import numpy as np
import pytest

from tests.finetune.conftest import slice_config
from transformer.data import pipeline
from transformer.data.tokenizer import load_tokenizer
from transformer.train import objectives


@pytest.mark.parametrize("task, recipe, variant", [
    ("sst2", "glue", "sst2,ci"), ("wnut17", "ner", "ci"), ("semeval", "relation", "ci")])
def test_packed_training_batches_hold_the_padded_examples(slices, cache_dir, tokenizer_dir, task,
                                                          recipe, variant):
    config = slice_config(recipe, variant, slices[task], cache_dir)
    config.mesh = {"data": 1, "fsdp": 1, "tensor": -1}  # Rows split over one device.
    config.data.max_length = 128  # Rows long enough for several examples each.
    tokenizer = load_tokenizer(tokenizer_dir)
    multiple = objectives.pack_row_multiple(config, process_count=1)
    assert multiple == 1  # A batch of 8 examples grows by one row at a time.
    padded = pipeline.create_task_dataset(config.data, "train", tokenizer=tokenizer)
    packed = pipeline.create_task_dataset(config.data, "train", tokenizer=tokenizer,
                                          pack_row_multiple=multiple)
    rows_used = []
    for a, b in itertools.islice(zip(padded, packed), 6):
        lengths = a["attention_mask"].sum(1)
        np.testing.assert_array_equal(b["example_lengths"], lengths)
        for i, n in enumerate(lengths):
            r, s = b["example_rows"][i], b["example_starts"][i]
            np.testing.assert_array_equal(b["input_ids"][r, s:s + n], a["input_ids"][i, :n])
            if a["labels"].ndim == 2:
                np.testing.assert_array_equal(b["labels"][r, s:s + n], a["labels"][i, :n])
        if a["labels"].ndim == 1:
            np.testing.assert_array_equal(b["labels"], a["labels"])
        if "entity_positions" in a:
            np.testing.assert_array_equal(b["entity_positions"], a["entity_positions"])
        rows_used.append(b["input_ids"].shape[0])
    assert max(rows_used) < config.data.global_batch_size


def test_packing_is_off_where_it_cannot_apply(slices, cache_dir):
    config = slice_config("squad", "ci", slices["squad"], cache_dir)
    assert objectives.pack_row_multiple(config, process_count=1) is None  # QA windows
    config = slice_config("glue", "sst2,ci", slices["sst2"], cache_dir)
    assert objectives.pack_row_multiple(config, process_count=2) is None
    config.grad_accum_steps = 2
    assert objectives.pack_row_multiple(config, process_count=1) is None
    config.grad_accum_steps, config.data.pack_examples = 1, False
    assert objectives.pack_row_multiple(config, process_count=1) is None
