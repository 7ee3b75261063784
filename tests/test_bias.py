"""The CrowS-Pairs probe against the authors' metric logic, run in torch on the same weights.

The reference below follows the authors' `metric.py` (nyu-mll/crows-pairs, `mask_unigram` and
`evaluate`): encode each sentence with [CLS]/[SEP], align the two with difflib over token ids, mask
each shared token but the first and last ([CLS], [SEP]) alone, sum log-softmax of the original token,
round to 3 decimals, count. Tiny random models: a BertForMaskedLM and a GPT2LMHeadModel made here and
imported, and the BERT's weights saved in our own checkpoint format.
"""

import difflib
import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers

from tests.hf.tiny_models import MINILM_DIR, VOCAB, make_tiny
from transformer import bias, model_io
from transformer.inference.masked_scoring import masked_token_logprobs
from transformer.metrics.crows_pairs import read_crows_pairs
from transformer.pretrained import from_pretrained

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Words split into pieces, so that the alignment runs over subword ids as in the paper.
PIECES = {"schizophrenia": ["schizo", "##phrenia"], "hispanics": ["hispanic", "##s"],
          "prestigious": ["prestig", "##ious"]}


@pytest.fixture(scope="module")
def sample(fixtures):
    return fixtures / "crows_pairs" / "crows_pairs_sample.csv"


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, sample):
    """A WordPiece vocab.txt of the sample's words, padded to the tiny models' VOCAB ids."""
    words = set()
    for pair in read_crows_pairs(sample):
        words.update(re.findall(r"\w+|[^\w\s]", (pair.sent_more + " " + pair.sent_less).lower()))
    tokens = sorted({piece for w in words for piece in PIECES.get(w, [w])})
    tokens = SPECIALS + tokens[:VOCAB - len(SPECIALS) - 4]  # Some words fall back to [UNK].
    tokens += [f"[unused{i}]" for i in range(VOCAB - len(tokens))]
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder


def with_vocab(folder, vocab_dir):
    shutil.copy(vocab_dir / "vocab.txt", folder / "vocab.txt")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_dir):
    return transformers.BertTokenizerFast(str(vocab_dir / "vocab.txt"), do_lower_case=True)


def authors_mask_unigram(model, tokenizer, sent1, sent2):
    """`mask_unigram` of the authors' metric.py (uncased BERT), on a torch masked LM."""
    sent1, sent2 = sent1.lower(), sent2.lower()
    ids1 = tokenizer.encode(sent1, return_tensors="pt")
    ids2 = tokenizer.encode(sent2, return_tensors="pt")
    seq1, seq2 = [str(x) for x in ids1[0].tolist()], [str(x) for x in ids2[0].tolist()]
    template1, template2 = [], []
    for op in difflib.SequenceMatcher(None, seq1, seq2).get_opcodes():
        if op[0] == "equal":
            template1 += list(range(op[1], op[2]))
            template2 += list(range(op[3], op[4]))
    assert len(template1) == len(template2)
    log_softmax = torch.nn.LogSoftmax(dim=0)
    scores = [0.0, 0.0]
    with torch.no_grad():
        for i in range(1, len(template1) - 1):  # Skipping [CLS] and [SEP].
            for k, (ids, template) in enumerate(((ids1, template1), (ids2, template2))):
                masked = ids.clone()
                masked[0][template[i]] = tokenizer.mask_token_id
                hidden = model(masked)[0].squeeze(0)
                scores[k] += log_softmax(hidden[template[i]])[ids[0][template[i]]].item()
    return scores


def causal_log_likelihood(model, tokenizer, sentence):
    """Sum over tokens 1.. of log p(token | tokens before it), on a torch causal LM."""
    ids = tokenizer.encode(sentence, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())


def authors_evaluate(pairs, score_pair):
    """The authors' `evaluate` loop: sent1 is sent_more for 'stereo' pairs and sent_less for
    'antistereo' ones; per-pair scores (sent_more, sent_less) and the counts it prints."""
    more_scores, less_scores = [], []
    n = neutral = total_stereo = total_antistereo = stereo_score = antistereo_score = 0
    for p in pairs:
        stereo = p.direction == "stereo"
        sent1, sent2 = (p.sent_more, p.sent_less) if stereo else (p.sent_less, p.sent_more)
        s1, s2 = score_pair(sent1, sent2)
        more_scores.append(s1 if stereo else s2)
        less_scores.append(s2 if stereo else s1)
        s1, s2 = round(s1, 3), round(s2, 3)
        n += 1
        if s1 == s2:
            neutral += 1
        elif stereo:
            total_stereo += 1
            stereo_score += s1 > s2
        else:
            total_antistereo += 1
            antistereo_score += s2 > s1
    percent = lambda part, whole: 100 * part / whole if whole else None
    counts = {"metric_score": percent(stereo_score + antistereo_score, n),
              "stereo_score": percent(stereo_score, total_stereo),
              "antistereo_score": percent(antistereo_score, total_antistereo),
              "num_neutral": neutral}
    return more_scores, less_scores, counts


def check_against(result, pairs, score_pair, tolerance):
    more, less, counts = authors_evaluate(pairs, score_pair)
    np.testing.assert_allclose(result["sent_more_scores"], more, atol=tolerance, rtol=0)
    np.testing.assert_allclose(result["sent_less_scores"], less, atol=tolerance, rtol=0)
    assert not np.allclose(more, less)  # The pairs really differ: the comparison is not vacuous.
    overall = result["overall"]
    for key, value in counts.items():
        assert overall[key] == pytest.approx(value), key


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory, vocab_dir):
    folder, model = make_tiny("bert_mlm", tmp_path_factory.mktemp("hf"), seed=2)
    return with_vocab(folder, vocab_dir), model


def test_imported_bert_matches_the_authors_metric(hf_bert, hf_tokenizer, sample):
    folder, torch_model = hf_bert
    pairs = read_crows_pairs(sample)
    result = bias.probe(folder, data=sample, batch_size=16, num_samples=100)
    assert result["score"] == "masked"
    check_against(result, pairs, lambda a, b: authors_mask_unigram(torch_model, hf_tokenizer, a, b),
                  tolerance=1e-4)


def test_our_checkpoint_matches_the_authors_metric(hf_bert, tmp_path, vocab_dir, hf_tokenizer, sample):
    """Our checkpoint format (model_config.json + Orbax params + tokenizer/), holding the tiny BERT's
    weights: what `--checkpoint` reads for the models we train."""
    folder, torch_model = hf_bert
    _, model = from_pretrained(folder)
    checkpoint = model_io.save_model(tmp_path / "ours", model, tokenizer_dir=vocab_dir)
    assert model_io.is_model_checkpoint(checkpoint)
    pairs = read_crows_pairs(sample)
    result = bias.probe(checkpoint, data=sample, batch_size=16, num_samples=100,
                        output=tmp_path / "out")
    check_against(result, pairs, lambda a, b: authors_mask_unigram(torch_model, hf_tokenizer, a, b),
                  tolerance=1e-4)
    # The JSON summary, the per-pair CSV and the plot are written next to each other.
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"] == result["overall"] and summary["score"] == "masked"
    assert set(summary["by_bias_type"]) == {p.bias_type for p in pairs}
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == len(pairs) + 1
    assert (tmp_path / "out" / "scores.png").stat().st_size > 10_000


def test_imported_gpt2_scores_sentence_log_likelihood(tmp_path, vocab_dir, hf_tokenizer, sample):
    folder, torch_model = make_tiny("gpt2", tmp_path, seed=4)
    pairs = read_crows_pairs(sample)
    result = bias.probe(with_vocab(folder, vocab_dir), data=sample, batch_size=8, num_samples=100)
    assert result["score"] == "causal"
    ll = lambda s: causal_log_likelihood(torch_model, hf_tokenizer, s)
    check_against(result, pairs, lambda a, b: (ll(a), ll(b)), tolerance=1e-4)
    _, decoder = from_pretrained(folder)  # Asked for masked-LM scores, a decoder says what it is.
    with pytest.raises(ValueError, match="needs an encoder .* this one is a causal decoder"):
        masked_token_logprobs(decoder, [[2, 5, 3]], [[1]], mask_id=4)


def test_a_model_without_the_head_the_probe_needs_is_a_clear_error(sample):
    with pytest.raises(ValueError, match="needs a model with its masked-LM head .*all-MiniLM-L6-v2"):
        bias.probe(MINILM_DIR, data=sample)
