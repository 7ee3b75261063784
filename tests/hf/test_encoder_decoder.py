"""T5 (v1.0, v1.1, an untied flan-T5-style head) and BART against transformers (PyTorch):
teacher-forced encoder states and logits on padded batches, packing, export."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.hf.tiny_models import make_tiny, random_ids, untie_t5_head
from transformer.hf import export_hf, load_hf_model

FAMILIES = ("t5", "t5_untied", "bart")  # T5 v1.0; v1.1 (flan-T5: gated, untied); BART.
SOURCE_LENGTHS, TARGET_LENGTHS = [23, 9, 16], [11, 4, 7]  # Right padding; past T5's max_exact.


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → (HF folder, torch model, our imported model)."""
    root = tmp_path_factory.mktemp("seq2seq")
    made = {}
    for name in FAMILIES:
        folder, hf = make_tiny("t5_v1_1" if name == "t5_untied" else name, root)  # 3 decoder layers.
        if name == "t5_untied":
            folder = untie_t5_head(hf, root / name)
        made[name] = (folder, hf, load_hf_model(folder))
    return made


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted(graphdef, methods, state, calls):
    model = nnx.merge(graphdef, state)
    return [getattr(model, m)(*args, **kwargs) for m, (args, kwargs) in zip(methods, calls)]


def run(model, *calls):
    """Each (method, args, kwargs) of `calls` on the model, compiled together as one function
    (eager NNX calls, or one compilation each, cost seconds here)."""
    graphdef, state = nnx.split(model)
    methods = tuple(c[0] for c in calls)
    return _jitted(graphdef, methods, state, [(c[1], c[2]) for c in calls])


def _batch(seed: int = 0):
    b = len(SOURCE_LENGTHS)
    source = random_ids(b, max(SOURCE_LENGTHS), seed, low=3)
    target = random_ids(b, max(TARGET_LENGTHS), seed + 1, low=3)
    source_mask = (np.arange(source.shape[1]) < np.array(SOURCE_LENGTHS)[:, None]).astype(np.int32)
    target_mask = (np.arange(target.shape[1]) < np.array(TARGET_LENGTHS)[:, None]).astype(np.int32)
    return source * source_mask, source_mask, target * target_mask, target_mask


def _hf_forward(hf, source, source_mask, target, target_mask):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        out = hf(input_ids=t(source), attention_mask=t(source_mask), decoder_input_ids=t(target),
                 decoder_attention_mask=t(target_mask))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_forcing_matches_transformers(models, name):
    _, hf, ours = models[name]
    source, source_mask, target, target_mask = _batch()
    want_encoded, want_logits = _hf_forward(hf, source, source_mask, target, target_mask)
    out, encoded = run(
        ours, ("__call__", (source, target), dict(attention_mask=source_mask,
                                                  decoder_attention_mask=target_mask)),
        ("encode", (source,), dict(attention_mask=source_mask)))
    assert np.abs(np.asarray(encoded) - want_encoded).max() <= 1e-4
    assert out.logits.shape == want_logits.shape and out.logits.dtype == np.float32
    assert np.abs(np.asarray(out.logits) - want_logits).max() <= 1e-4
    # Not vacuous: the logits spread well beyond the tolerance.
    assert np.ptp(want_logits) > 0.1


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_packed_row_equals_each_example_alone(models, name):
    _, _, ours = models[name]
    a_src, b_src = random_ids(1, 13, 5)[0], random_ids(1, 9, 6)[0]
    a_tgt, b_tgt = random_ids(1, 6, 7)[0], random_ids(1, 8, 8)[0]

    def rows(a, b, width):
        """Row 0: a and b packed (then padding); rows 1 and 2: a and b alone (then padding).
        Rows of a batch never interact, so each of rows 1 and 2 is its example alone."""
        ids, segments, positions = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32), \
            np.zeros((3, width), np.int32)
        for row, parts in enumerate(([a, b], [a], [b])):
            start = 0
            for k, part in enumerate(parts, 1):
                ids[row, start:start + len(part)] = part
                segments[row, start:start + len(part)] = k
                positions[row, start:start + len(part)] = np.arange(len(part))
                start += len(part)
        return ids, segments, positions

    src, src_seg, src_pos = rows(a_src, b_src, len(a_src) + len(b_src) + 3)
    tgt, tgt_seg, tgt_pos = rows(a_tgt, b_tgt, len(a_tgt) + len(b_tgt) + 2)
    [out] = run(ours, ("__call__", (src, tgt), dict(
        segment_ids=src_seg, positions=src_pos, decoder_segment_ids=tgt_seg,
        decoder_positions=tgt_pos)))
    logits = np.asarray(out.logits)
    n = len(a_tgt)
    assert np.abs(logits[0, :n] - logits[1, :n]).max() <= 1e-5
    assert np.abs(logits[0, n:n + len(b_tgt)] - logits[2, :len(b_tgt)]).max() <= 1e-5
    assert np.abs(logits[1, :n] - logits[2, :n]).max() > 0.1  # The examples do differ.


@pytest.mark.parametrize("name", ["t5", "t5_untied", "bart"])
def test_export_loads_in_transformers_with_the_same_logits(models, name, tmp_path):
    _, hf, ours = models[name]
    folder = export_hf(ours, tmp_path / name)
    cls = (transformers.BartForConditionalGeneration if name == "bart"
           else transformers.T5ForConditionalGeneration)
    reloaded = cls.from_pretrained(folder).eval()
    batch = _batch(seed=3)
    want = _hf_forward(hf, *batch)[1]
    got = _hf_forward(reloaded, *batch)[1]
    assert np.abs(got - want).max() <= 1e-5
    # The exported folder imports back to the same model.
    again = load_hf_model(folder)
    assert again.config == ours.config


def test_sharded_safetensors_folder_imports_the_same(models, tmp_path):
    folder, hf, ours = models["bart"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    again = load_hf_model(tmp_path / "sharded")
    mine = nnx.to_flat_state(nnx.state(ours, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    for path, variable in mine:
        np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(theirs[path][...]))
