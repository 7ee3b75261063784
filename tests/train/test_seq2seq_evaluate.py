"""`transformer.evaluate` on a seq2seq checkpoint (the summarization :ci recipe's model, saved as
the trainer saves it): greedy decoding reproduces the model's own greedy tokens, and greedy, beam
search and int8 weights each write predictions whose BLEU, chrF and ROUGE, recomputed straight
from sacreBLEU and rouge-score on the written file, are the figures returned.

The model is not trained (training it far enough to say real words would take minutes), and
its references are made to overlap its outputs instead, by appending each greedy prediction to the
synopsis of its example, so that every metric, not only chrF, is far from 0 in the comparison."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import nnx
from rouge_score import rouge_scorer

from tests.test_recipes import load
from transformer.data import seq2seq
from transformer.evaluate import evaluate_checkpoint
from transformer.models import MODELS, ModelConfig
from transformer.train import best, seq2seq_eval, trainer

TEST_EXAMPLES = 20  # tests/fixtures/debian/test.jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("summarization")
    config = load("summarization").get_config("ci")
    config.data.cache_dir = str(workdir / "cache")
    config.seq2seq.metrics = "bleu,chrf,rouge"
    tokenizer = trainer.get_tokenizer(config)  # Trained on the sample at first use, cached.
    model = MODELS["encoder_decoder"](ModelConfig.from_dict(config.model.to_dict()),
                                      rngs=nnx.Rngs(0))
    # A random tied model repeats its input token (its own row scores highest): zeroing the rows
    # of the special tokens (pad = decoder start, EOS, ...) and those past the tokenizer's pieces
    # makes it write pieces that decode to text, EOS never among them.
    table = model.embeddings.tokens
    special = max(tokenizer.pad_id or 0, tokenizer.eos_id) + 1
    table[...] = table[...].at[:special].set(0.0).at[tokenizer.vocab_size:].set(0.0)
    best.save_task_model(workdir / "model", model)
    return config, workdir, model, tokenizer


def library_scores(predictions_file):
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    predictions = [r["prediction"] for r in rows]
    references = [r["references"][0] for r in rows]  # One synopsis per package.
    assert all(len(r["references"]) == 1 for r in rows)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    scores = {f"eval_{t}": 100 * float(np.mean([s[t].fmeasure for s in rouge]))
              for t in ("rouge1", "rouge2", "rougeL")}
    scores["eval_bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    scores["eval_chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    return predictions, scores


def check(results, out_dir, num_beams):
    predictions, scores = library_scores(out_dir / "predictions.jsonl")
    assert len(predictions) == results["eval_examples"] == TEST_EXAMPLES
    for name, value in scores.items():
        assert results[name] == pytest.approx(value, abs=1e-9), name
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["num_beams"] == num_beams and saved["split"] == "test"
    assert saved["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert {k: saved[k] for k in scores} == {k: results[k] for k in scores}
    return predictions


@pytest.fixture(scope="module")
def greedy(run, tmp_path_factory):
    config, workdir, _, _ = run
    out_dir = tmp_path_factory.mktemp("greedy")
    return evaluate_checkpoint(config, workdir / "model", output=out_dir), out_dir


def test_greedy_decodes_the_checkpoint_and_scores_equal_the_libraries(run, greedy):
    config, _, model, tokenizer = run
    predictions = check(*greedy, num_beams=1)
    assert greedy[0]["eval_chrf"] > 0
    # The model's own greedy tokens on the first examples, decoded: the checkpoint was loaded.
    examples = seq2seq.eval_examples(config, "test", tokenizer, 0, 1)
    inputs, lengths = examples.inputs[:8], examples.lengths[:8]
    segments = (np.arange(inputs.shape[1]) < lengths[:, None]).astype(np.int32)
    graphdef, params = nnx.split(model)
    decode = seq2seq_eval.make_greedy(graphdef, config.seq2seq.max_target_length,
                                      config.model.decoder_start_token_id, tokenizer.eos_id,
                                      tokenizer.pad_id or 0)
    ids = np.asarray(decode(params, jnp.asarray(inputs), jnp.asarray(segments)))
    assert [tokenizer.decode(seq2seq_eval.cut_at_eos(row, tokenizer.eos_id)) for row in ids] == \
        predictions[:8]


def test_beam_search_on_int8_weights_scores_equal_the_libraries(run, greedy, tmp_path):
    config, workdir, _, _ = run
    predictions, _ = library_scores(greedy[1] / "predictions.jsonl")
    with open(config.data.local_files.test) as f:
        rows = [json.loads(line) for line in f]
    overlapping = tmp_path / "overlapping.jsonl"  # Each synopsis with the greedy prediction.
    overlapping.write_text("".join(json.dumps({**row, "summary": f"{p} {row['summary']}"}) + "\n"
                                   for row, p in zip(rows, predictions, strict=True)))
    config = config.copy_and_resolve_references()
    config.data.local_files.test = str(overlapping)
    results = evaluate_checkpoint(config, workdir / "model", split="test",
                                  output=tmp_path / "out", quantize="int8", num_beams=2)
    check(results, tmp_path / "out", num_beams=2)
    for name in ("eval_bleu", "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL"):
        assert results[name] > 5, name  # Not 0 == 0.


def test_bad_arguments_are_refused(run, tmp_path):
    config, workdir, _, _ = run
    with pytest.raises(ValueError, match="--num_beams=-1 must be at least 1"):
        evaluate_checkpoint(config, workdir / "model", num_beams=-1)
    with pytest.raises(ValueError, match="--num_beams=2 applies to seq2seq recipes"):
        evaluate_checkpoint(load("glue").get_config("sst2"), workdir / "model", num_beams=2)
    with pytest.raises(FileNotFoundError, match="holds no model checkpoint"):
        evaluate_checkpoint(config, tmp_path)
