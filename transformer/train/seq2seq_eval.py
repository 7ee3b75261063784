"""Evaluation of a seq2seq model by generation: every example of the split exactly once.

The split's sources (transformer/data/seq2seq.py) are cut into fixed-shape batches (the last
padded with empty rows), the model generates for each (the encoder runs once, then the cached
decoder loop: greedy, or with `seq2seq.num_beams` > 1 beam search, transformer/inference/beam.py),
and the detokenized outputs are scored against all their references with `seq2seq.metrics`
(BLEU and chrF by sacreBLEU, ROUGE by rouge-score). Every process builds the
layout of every process's examples, so all map the global outputs back to examples and compute
the same metrics; process 0 writes `predictions.jsonl` (each prediction with its references) and
`metrics.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from transformer import paths
from transformer.data import pipeline, seq2seq
from transformer.inference import seq2seq as seq2seq_generate
from transformer.inference.beam import BeamConfig
from transformer.metrics import generation
from transformer.train import distributed


def make_greedy(graphdef: nnx.GraphDef, max_length: int, start_id: int, eos_id: int,
                pad_id: int):
    """(params, inputs [B, S], segment_ids [B, S]) → generated ids [B, max_length]: the argmax
    token each step, `pad_id` after EOS."""

    def generate(params: Any, inputs: jax.Array, segment_ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        batch = inputs.shape[0]
        encoded = model.encode(inputs, segment_ids=segment_ids)
        cache = model.init_cache(batch, max_length, encoded, segment_ids)
        cache_segments = jnp.ones((batch, max_length), jnp.int32)
        ones = jnp.ones((batch, 1), jnp.int32)

        def step(i, carry):
            cache, token, out, done = carry
            o = model.decode(token[:, None], None, segment_ids, decoder_segment_ids=ones,
                             cache=cache, cache_index=i, cache_segment_ids=cache_segments)
            token = jnp.argmax(o.logits[:, -1], axis=-1).astype(jnp.int32)
            token = jnp.where(done, pad_id, token)
            return o.cache, token, out.at[:, i].set(token), done | (token == eos_id)

        start = jnp.full((batch,), start_id, jnp.int32)
        carry = (cache, start, jnp.full((batch, max_length), pad_id, jnp.int32),
                 jnp.zeros((batch,), bool))
        return jax.lax.fori_loop(0, max_length, step, carry)[2]

    return generate


def cut_at_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    ids = ids.tolist()
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


class GenerationEvaluator:
    """`evaluator(params, step)` → {'eval_bleu': ..., 'eval_chrf': ... or 'eval_rouge1': ...}."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any,
                 graphdef: nnx.GraphDef, params_sharding: Any, batch_sharding: NamedSharding, *,
                 split: str, workdir: str | os.PathLike | None = None,
                 out_dir: str | os.PathLike | None = None):
        seq = config.seq2seq
        if seq.num_beams > 1 and jax.process_count() > 1:
            raise ValueError(f"seq2seq.num_beams={seq.num_beams}: beam-search evaluation runs "
                             "on one process; evaluate greedily (num_beams=1) on several")
        self.metrics = [m for m in str(seq.metrics).split(",") if m]
        generation.generation_metrics(["x"], ["x"], self.metrics)  # Unknown names fail now.
        self.tokenizer, self.batch_sharding, self.split = tokenizer, batch_sharding, split
        if out_dir is None and workdir is not None:
            out_dir = paths.as_path(workdir) / "eval"
        self.out_dir = None if out_dir is None else paths.as_path(out_dir)
        count, me = jax.process_count(), jax.process_index()
        sets = [seq2seq.eval_examples(config, split, tokenizer, p, count) for p in range(count)]
        if not sum(len(s.references) for s in sets):
            raise ValueError(f"the eval split {split!r} has no usable examples")
        self.per_process = pipeline.per_process_batch(config.data, count)
        self.num_batches = max(math.ceil(len(s.references) / self.per_process) for s in sets)
        self.sets, self.mine = sets, sets[me]
        self.report = self.mine.report
        max_length = seq.max_decode_length or seq.max_target_length
        self.graphdef, self.mesh = graphdef, batch_sharding.mesh
        self.rules = [tuple(r) for r in config.logical_axis_rules]
        self.beam = None if seq.num_beams == 1 else BeamConfig(
            num_beams=seq.num_beams, max_new_tokens=max_length, length_penalty=seq.length_penalty,
            early_stopping=True, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id or 0)
        generate = make_greedy(graphdef, max_length, config.model.decoder_start_token_id,
                               tokenizer.eos_id, tokenizer.pad_id or 0)
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        self.generate = jax.jit(generate, in_shardings=(params_sharding, batch_sharding,
                                                        batch_sharding),
                                out_shardings=replicated)

    def batch(self, examples: seq2seq.EvalExamples, b: int) -> dict[str, np.ndarray]:
        """Rows b·size ... of one process's examples, padded with empty rows to the batch size."""
        size = self.per_process
        inputs = np.zeros((size, examples.inputs.shape[1]), np.int32)
        chunk = examples.inputs[b * size : (b + 1) * size]
        inputs[: len(chunk)] = chunk
        lengths = np.zeros(size, np.int32)
        lengths[: len(chunk)] = examples.lengths[b * size : (b + 1) * size]
        segment_ids = (np.arange(inputs.shape[1]) < lengths[:, None]).astype(np.int32)
        return {"inputs": inputs, "segment_ids": segment_ids}

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        if self.beam is not None:
            return self.beam_search(params, step)
        outputs = []
        for b in range(self.num_batches):  # Dispatch all, then fetch: the device never waits.
            batch = distributed.to_global(self.batch(self.mine, b), self.batch_sharding)
            outputs.append(self.generate(params, batch["inputs"], batch["segment_ids"]))
        predictions, references = [], []
        size = self.per_process
        for b, out in enumerate(outputs):
            out = np.asarray(out)
            for p, examples in enumerate(self.sets):  # Global rows: process p's part is p-th.
                for r in range(size):
                    index = b * size + r
                    if index < len(examples.references):
                        ids = cut_at_eos(out[p * size + r], self.tokenizer.eos_id)
                        predictions.append(self.tokenizer.decode(ids))
                        references.append(examples.references[index])
        return self.score(predictions, references, step)

    def beam_search(self, params: Any, step: int) -> dict[str, float]:
        """The best beam of each example (transformer/inference/seq2seq.py; one process).
        Every batch has the same shape (rows of the full source width, the last batch filled
        with one-token inputs whose outputs are dropped): one compiled search for the split."""
        model = nnx.merge(self.graphdef, params)
        examples, size = self.mine, self.per_process
        predictions = []
        for b in range(self.num_batches):
            rows = range(b * size, min((b + 1) * size, len(examples.references)))
            inputs = [examples.inputs[i, : examples.lengths[i]].tolist() for i in rows]
            if not inputs:
                continue
            filler = [[self.tokenizer.eos_id]] * (size - len(inputs))
            out = seq2seq_generate.seq2seq_beam_generate(
                model, inputs + filler, self.beam, mesh=self.mesh, rules=self.rules,
                width=examples.inputs.shape[1])
            predictions += [self.tokenizer.decode(cut_at_eos(np.asarray(h[0]),
                                                             self.tokenizer.eos_id))
                            for h in out.sequences()[: len(inputs)]]
        return self.score(predictions, list(examples.references), step)

    def score(self, predictions: list[str], references: list[list[str]],
              step: int) -> dict[str, float]:
        values = generation.generation_metrics(predictions, references, self.metrics)
        result = {f"eval_{k}": float(v) for k, v in values.items() if not isinstance(v, str)}
        result["eval_examples"] = float(len(predictions))
        for reason, n in self.report.counts.items():
            result[f"eval_count_{reason}"] = float(n)
        if self.out_dir is not None and jax.process_index() == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"prediction": p, "references": r}, ensure_ascii=False)
                     for p, r in zip(predictions, references, strict=True)]
            (self.out_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n")
            decoding = {"num_beams": self.beam.num_beams if self.beam else 1}
            signature = {k: v for k, v in values.items() if isinstance(v, str)}
            (self.out_dir / "metrics.json").write_text(json.dumps(
                {"step": step, "split": self.split, **decoding, **signature, **result},
                indent=1) + "\n")
            if "bleu_signature" in values:
                logging.info("step %d: sacreBLEU %s", step, values["bleu_signature"])
        return result
