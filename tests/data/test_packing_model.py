"""Per-segment log-probabilities of a model on packed rows equal those of the sequences unpacked."""

import gzip
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from transformer.data import packing
from transformer.data.hf_tokenizers import gpt2_tokenizer
from transformer.models import build_model, get_preset

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_packed_rows_score_like_unpacked_sequences(fixtures):
    tokenizer = gpt2_tokenizer(fixtures / "tokenizers" / "encoder.json",
                               fixtures / "tokenizers" / "vocab.bpe")
    with gzip.open(REPO / "data" / "shakespeare" / "validation.txt.gz", "rt") as f:
        paragraphs = [p for p in f.read(20_000).split("\n\n") if p.strip()][:24]
    sequences = [np.asarray(tokenizer.encode(p)[:40], np.int32) for p in paragraphs]
    source = grain.MapDataset.source([{"tokens": s} for s in sequences]).to_iter_dataset()
    rows = list(packing.PackIterDataset(source, 64))
    batch = packing.causal_lm_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})

    model = build_model(get_preset("llama-tiny", vocab_size=50304, hidden_size=32, num_layers=2,
                                   num_heads=4, num_kv_heads=2, mlp_dim=64), seed=0)
    score = jax.jit(lambda ids, seg, pos: jax.nn.log_softmax(
        model(ids, segment_ids=seg, positions=pos).logits))
    log_probs = score(batch["inputs"], batch["segment_ids"], batch["positions"])
    packed = jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]

    # Every segment (a sequence, or each piece of one cut at a row end), run alone, right-padded.
    pieces = []
    for r in range(len(rows)):
        for segment in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            pieces.append((r, np.flatnonzero(batch["segment_ids"][r] == segment)))
    alone_ids = np.zeros((len(pieces), 64), np.int32)
    alone_segments = np.zeros((len(pieces), 64), np.int32)
    for i, (r, where) in enumerate(pieces):
        alone_ids[i, : len(where)] = batch["inputs"][r, where]
        alone_segments[i, : len(where)] = 1
    positions = np.broadcast_to(np.arange(64, dtype=np.int32), alone_ids.shape)
    alone = score(alone_ids, alone_segments, positions)
    for i, (r, where) in enumerate(pieces):
        n = len(where)
        expected = jnp.take_along_axis(alone[i, : n - 1], alone_ids[i, 1:n, None], -1)[:, 0]
        weights = batch["weights"][r, where]
        assert weights[-1] == 0 and np.all(weights[:-1] == 1)  # No target across segments.
        np.testing.assert_allclose(packed[r, where[:-1]], expected, atol=2e-5)
    assert len(pieces) > len(sequences)  # Some sequences were cut across rows, and checked too.
