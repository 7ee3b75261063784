"""BLEU/chrF (sacreBLEU) and ROUGE (rouge-score) wrappers on the libraries' own published examples:
sacreBLEU's README corpus (BLEU 48.53, chrF 59.73) and rouge-score's unit-test cases."""

import pytest

from transformer.metrics import generation

# sacreBLEU's README example: three system sentences, two reference streams.
SYSTEM = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
STREAMS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
           ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
PER_EXAMPLE = [list(refs) for refs in zip(*STREAMS, strict=True)]


def test_bleu_and_chrf_reproduce_the_sacrebleu_readme():
    # README: "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)"
    out = generation.bleu(SYSTEM, PER_EXAMPLE)
    assert out["bleu"] == pytest.approx(48.53, abs=5e-3)
    assert [round(out[f"bleu_precision_{n}"], 1) for n in (1, 2, 3, 4)] == [82.4, 50.0, 45.5, 37.5]
    assert out["bleu_brevity_penalty"] == pytest.approx(0.943, abs=5e-4)
    assert "tok:13a" in out["bleu_signature"] and "nrefs:2" in out["bleu_signature"]
    assert generation.chrf(SYSTEM, PER_EXAMPLE)["chrf"] == pytest.approx(59.73, abs=5e-3)


def test_references_may_differ_in_number_per_example():
    # A reference repeated changes neither clipped counts nor the closest length: an example with
    # one reference scores as if it had that one twice.
    ragged = [PER_EXAMPLE[0], PER_EXAMPLE[1][:1], PER_EXAMPLE[2]]
    doubled = [PER_EXAMPLE[0], PER_EXAMPLE[1][:1] * 2, PER_EXAMPLE[2]]
    assert generation.bleu(SYSTEM, ragged)["bleu"] == pytest.approx(
        generation.bleu(SYSTEM, doubled)["bleu"])
    assert generation.chrf(SYSTEM, ragged)["chrf"] == pytest.approx(
        generation.chrf(SYSTEM, doubled)["chrf"])
    # A single string is one reference.
    assert generation.bleu(SYSTEM, STREAMS[0]) == generation.bleu(SYSTEM, [[r] for r in STREAMS[0]])


@pytest.mark.parametrize("target, prediction, rouge_type, f", [
    # rouge-score's rouge_scorer_test.py: (target, prediction) → F-measure.
    ("testing one two", "testing", "rouge1", 1 / 2),
    ("testing one two", "testing one", "rouge2", 2 / 3),
    ("testing one two", "testing one", "rougeL", 4 / 5),
    ("testing one two", "testing two", "rougeL", 4 / 5),
    ("w1 w2 w3 w4 w5", "w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5", "rougeLsum", 0.5333),
    ("testing one two", "", "rouge1", 0.0),
])
def test_rouge_reproduces_rouge_score_tests(target, prediction, rouge_type, f):
    out = generation.rouge([prediction], [target], types=[rouge_type])
    assert out[rouge_type] == pytest.approx(100 * f, abs=0.01)


def test_rouge_takes_the_best_reference_and_averages_examples():
    # "testing" against "testing one two" (F 1/2) and "testing one" (F 2/3): the best is kept.
    best = generation.rouge(["testing"], [["testing one two", "testing one"]], types=["rouge1"])
    assert best["rouge1"] == pytest.approx(100 * 2 / 3)
    # Two examples: the mean of their F-measures (1/2 and 4/5).
    mean = generation.rouge(["testing", "testing one"], ["testing one two", "testing one two"],
                            types=["rouge1"])
    assert mean["rouge1"] == pytest.approx(100 * (1 / 2 + 4 / 5) / 2)
    # Stemming is on: "runs" and "running" both stem to "run".
    assert generation.rouge(["he runs"], ["he running"], types=["rouge1"])["rouge1"] == 100.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        generation.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="example 1 has no reference"):
        generation.rouge(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="unknown generation metric"):
        generation.generation_metrics(["a"], ["a"], ["meteor"])
