"""SQuAD v1.1 EM/F1 against the official evaluation logic; span decoding on hand-made logits."""

import json
import re
import string
import sys
from collections import Counter

import numpy as np
import pytest

from transformer.metrics import (
    answers_from_dataset,
    decode_predictions,
    evaluate_squad,
    normalize_answer,
    squad_em_f1,
    write_predictions,
)

# --- Reference: the functions of the official evaluate-v1.1.py, same behaviour. ---------------


def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def ref_exact_match_score(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def ref_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    message = "Unanswered question " + qa["id"] + " will receive score 0."
                    print(message, file=sys.stderr)
                    continue
                ground_truths = list(map(lambda x: x["text"], qa["answers"]))
                prediction = predictions[qa["id"]]
                exact_match += ref_metric_max_over_ground_truths(
                    ref_exact_match_score, prediction, ground_truths
                )
                f1 += ref_metric_max_over_ground_truths(ref_f1_score, prediction, ground_truths)
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {"exact_match": exact_match, "f1": f1}


# --- Real dev questions with perturbed predictions. -------------------------------------------


@pytest.fixture(scope="module")
def dev(fixtures):
    with open(fixtures / "squad" / "dev-v1.1.json", encoding="utf-8") as f:
        return json.load(f)["data"]


def _perturbed_predictions(dataset, seed):
    rng = np.random.default_rng(seed)
    preds = {}
    qas = [(p["context"], qa) for a in dataset for p in a["paragraphs"] for qa in p["qas"]]
    for context, qa in qas:
        gt = qa["answers"][rng.integers(len(qa["answers"]))]
        text, start = gt["text"], gt["answer_start"]
        kind = rng.integers(9)
        if kind == 0:
            continue  # unanswered
        if kind == 1:
            pred = text
        elif kind == 2:
            pred = "The " + text.upper() + "!"
        elif kind == 3:
            pred = " ".join(text.split()[:-1])  # drop the last word
        elif kind == 4:
            pred = context[max(0, start - 15) : start + len(text) + 10]  # extra words around
        elif kind == 5:
            pred = ""
        elif kind == 6:
            pred = context[rng.integers(len(context)) :][:30]  # unrelated span
        elif kind == 7:
            pred = f"an {text},  a {text}"  # repeated tokens, articles, punctuation
        else:
            pred = text.replace(" ", "  ").replace("-", " ")
        preds[qa["id"]] = pred
    return preds


@pytest.mark.parametrize("seed", [0, 1])
def test_em_f1_match_official_on_dev(dev, seed, capsys):
    preds = _perturbed_predictions(dev, seed)
    want = ref_evaluate(dev, preds)
    got = evaluate_squad(dev, preds)
    assert got["exact_match"] == pytest.approx(want["exact_match"], rel=1e-12)
    assert got["f1"] == pytest.approx(want["f1"], rel=1e-12)
    assert 20 < got["f1"] < 90 and got["exact_match"] < got["f1"]
    assert got["total"] == 300  # The sample: 5 articles × 60 questions.
    assert got["missing"] == 300 - len(preds) > 0
    capsys.readouterr()


def test_normalize_answer_matches_official(dev):
    texts = [a["text"] for art in dev[:10] for p in art["paragraphs"] for qa in p["qas"]
             for a in qa["answers"]]
    texts += [p["context"] for art in dev[:3] for p in art["paragraphs"]]
    texts += ["The  Théâtre—d'an A.B.C.", "anthem the", "\tA\nan\u00a0the x"]
    for t in texts:
        assert normalize_answer(t) == ref_normalize_answer(t)


def test_hand_examples():
    answers = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["1990"], "q3": ["x b c d"]}
    got = squad_em_f1({"q1": "broncos", "q2": "in 1990", "q3": "b c e"}, answers)
    # q1: EM 1 ("the Broncos" -> "broncos"); q2: EM 0, F1 2/3; q3: P 2/3, R 2/4 -> F1 4/7.
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 4 / 7) / 3)
    assert answers_from_dataset(
        [{"paragraphs": [{"qas": [{"id": "x", "answers": [{"text": "t", "answer_start": 0}]}]}]}]
    ) == {"x": ["t"]}


# --- Span decoding. ----------------------------------------------------------------------------


def _window(question, context, context_start=0):
    """Tokens of "question [SEP] context[context_start:]" split on whitespace, with offsets."""
    q_tokens = question.split()
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)
             if m.start() >= context_start]
    n = len(q_tokens) + 1 + len(spans)
    offsets = np.zeros((n, 2), dtype=np.int64)
    offsets[len(q_tokens) + 1 :] = spans
    mask = np.zeros(n, dtype=bool)
    mask[len(q_tokens) + 1 :] = True
    return offsets, mask, len(q_tokens) + 1


CONTEXT = "In 1848,  Gold was found at Sutter's Mill (Coloma), California; the rush began."
# context tokens: 0 "In", 1 "1848,", 2 "Gold", 3 "was", 4 "found", 5 "at", 6 "Sutter's",
#                 7 "Mill", 8 "(Coloma),", 9 "California;", 10 "the", 11 "rush", 12 "began."


def _logits(n, starts, ends):
    s, e = np.full(n, -5.0), np.full(n, -5.0)
    for i, v in starts.items():
        s[i] = v
    for i, v in ends.items():
        e[i] = v
    return s, e


def _decode(s, e, offsets, mask, **kw):
    return decode_predictions(s[None], e[None], offsets[None], mask[None], ["q"],
                              {"q": CONTEXT}, **kw)["q"]


def test_decode_maps_offsets_to_original_substring():
    offsets, mask, c0 = _window("Where was gold found ?", CONTEXT)
    s, e = _logits(len(mask), {c0 + 6: 4.0}, {c0 + 8: 3.0})
    assert _decode(s, e, offsets, mask) == "Sutter's Mill (Coloma),"
    s, e = _logits(len(mask), {c0 + 1: 4.0}, {c0 + 2: 3.0})
    assert _decode(s, e, offsets, mask) == "1848,  Gold"  # inner whitespace kept verbatim


def test_decode_ignores_question_tokens_and_respects_max_length():
    offsets, mask, c0 = _window("Where was gold found ?", CONTEXT)
    # The best logits sit on question tokens; they must be ignored.
    s, e = _logits(len(mask), {0: 50.0, c0 + 2: 2.0}, {1: 50.0, c0 + 4: 2.0})
    assert _decode(s, e, offsets, mask) == "Gold was found"
    # Best pair (2..9) is 8 tokens long; with max 3 the best valid pair is 7..9.
    s, e = _logits(len(mask), {c0 + 2: 9.0, c0 + 7: 5.0}, {c0 + 9: 9.0, c0 + 3: 1.0})
    assert (_decode(s, e, offsets, mask, max_answer_length=8)
            == "Gold was found at Sutter's Mill (Coloma), California;")
    assert _decode(s, e, offsets, mask, max_answer_length=3) == "Mill (Coloma), California;"
    assert _decode(s, e, offsets, mask, max_answer_length=3, n_best=1) == ""
    # End before start is never chosen: best start 9, best end 2 -> next pairs.
    s, e = _logits(len(mask), {c0 + 9: 9.0, c0 + 11: 1.0}, {c0 + 2: 9.0, c0 + 12: 2.0})
    assert _decode(s, e, offsets, mask) == "California; the rush began."
    assert _decode(s, e, offsets, mask, n_best=1) == ""


def test_decode_picks_best_window_and_skips_padding():
    offsets_a, mask_a, ca = _window("q ?", CONTEXT)
    offsets_b, mask_b, cb = _window("q ?", CONTEXT, context_start=CONTEXT.index("Sutter"))
    n = max(len(mask_a), len(mask_b))

    def pad(x):
        return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])

    s_a, e_a = _logits(n, {ca + 2: 3.0}, {ca + 4: 3.0})  # "Gold was found", score 6
    s_b, e_b = _logits(n, {cb + 3: 4.0}, {cb + 3: 4.0})  # "California;", score 8
    s_p, e_p = _logits(n, {cb: 99.0}, {cb: 99.0})  # padding window
    args = dict(
        offsets=np.stack([pad(offsets_a), pad(offsets_b), pad(offsets_b)]),
        context_mask=np.stack([pad(mask_a), pad(mask_b), pad(mask_b)]),
        contexts={"q": CONTEXT, "r": CONTEXT},
    )
    got = decode_predictions(np.stack([s_a, s_b, s_p]), np.stack([e_a, e_b, e_p]),
                             example_ids=["q", "q", None], **args)
    assert got == {"q": "California;"}
    got = decode_predictions(np.stack([s_a, s_b, s_p]), np.stack([e_a, e_b, e_p]),
                             example_ids=["q", "r", "q"], **args)
    assert got == {"q": "Sutter's", "r": "California;"}
    # A question whose only window has no valid span gets "".
    got = decode_predictions(s_a[None], e_a[None], args["offsets"][:1],
                             np.zeros((1, n), dtype=bool), ["q"], {"q": CONTEXT})
    assert got == {"q": ""}


def test_write_predictions(tmp_path):
    preds = {"a": "Théâtre", "b": ""}
    path = write_predictions(preds, tmp_path / "out" / "predictions.json")
    assert json.loads(path.read_text(encoding="utf-8")) == preds
