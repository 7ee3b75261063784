"""Entity-level F1 against seqeval (default mode) on real WNUT-17 tags, corrupted predictions."""

import numpy as np
import pytest
from seqeval import metrics as sq
from seqeval.metrics.sequence_labeling import get_entities as sq_get_entities

from transformer.metrics import entity_f1, get_entities, subword_to_word_tags, tags_from_label_ids

TYPES = ("corporation", "creative-work", "group", "location", "person", "product")


def _read_tags(path):
    sentences, tags = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if tags:
                sentences.append(tags)
                tags = []
            continue
        tags.append(line.split()[-1])
    return sentences


def _iob2_to_iob1(tags):
    """IOB1 (CoNLL-2003's original scheme): B- only where an entity follows one of its own type."""
    out = []
    for i, tag in enumerate(tags):
        previous = tags[i - 1] if i else "O"
        if tag.startswith("B-") and previous[2:] != tag[2:]:
            tag = "I-" + tag[2:]
        out.append(tag)
    return out


@pytest.fixture(scope="module")
def valid_split(fixtures):
    """The sample's sentences in IOB2 (as released) and IOB1, with two adjacent same-type
    entities added (rare in WNUT-17), where IOB1 needs its B-."""
    folder = fixtures / "wnut17"
    iob2 = [s for name in ("train", "dev", "test") for s in _read_tags(folder / f"{name}.conll")]
    assert len(iob2) == 200
    iob2 += [["B-person", "I-person", "B-person", "O"], ["O", "B-location", "B-location"]]
    return [_iob2_to_iob1(s) for s in iob2], iob2


@pytest.fixture(scope="module")
def iob1(valid_split):
    return valid_split[0]


@pytest.fixture(scope="module")
def iob2(valid_split):
    return valid_split[1]


def _corrupt(sentences, seed):
    """Deterministic damage: flip types, drop/insert B-, shift and stretch boundaries, noise."""
    rng = np.random.default_rng(seed)
    out = []
    for tags in sentences:
        tags = list(tags)
        for i, tag in enumerate(list(tags)):
            u = rng.random()
            if tag != "O" and u < 0.08:  # flip the type of one token
                tags[i] = tag[:2] + TYPES[rng.integers(len(TYPES))]
            elif tag.startswith("B-") and u < 0.16:  # drop B- (I- start, or O)
                tags[i] = "I-" + tag[2:] if rng.random() < 0.5 else "O"
            elif tag.startswith("I-") and u < 0.22:  # split an entity
                tags[i] = "B-" + tag[2:]
            elif tag == "O" and i > 0 and tags[i - 1] != "O" and u < 0.15:  # stretch right
                tags[i] = "I-" + tags[i - 1][2:]
            elif tag == "O" and u < 0.02:  # spurious entity start
                tags[i] = rng.choice(["B-", "I-"]) + TYPES[rng.integers(len(TYPES))]
        if rng.random() < 0.1 and len(tags) > 1:  # shift every boundary by one token
            tags = ["O", *tags[:-1]]
        out.append(tags)
    return out


def _to_iobes(tags):
    out = []
    for i, tag in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        cont = nxt.startswith("I-") and nxt[2:] == tag[2:]
        if tag.startswith("B-"):
            out.append(tag if cont else "S-" + tag[2:])
        elif tag.startswith("I-"):
            out.append(tag if cont else "E-" + tag[2:])
        else:
            out.append(tag)
    return out


def _assert_matches_seqeval(gold, pred):
    ours = entity_f1(gold, pred)
    assert ours["precision"] == pytest.approx(sq.precision_score(gold, pred), abs=1e-12)
    assert ours["recall"] == pytest.approx(sq.recall_score(gold, pred), abs=1e-12)
    assert ours["f1"] == pytest.approx(sq.f1_score(gold, pred), abs=1e-12)
    report = sq.classification_report(gold, pred, output_dict=True, zero_division=0)
    assert ours["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)
    assert ours["support"] == report["micro avg"]["support"]
    types = sorted(k for k in report if not k.endswith(" avg"))
    assert sorted(ours["per_type"]) == types
    for t in types:
        got = ours["per_type"][t]
        want = report[t]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
            (want["precision"], want["recall"], want["f1-score"]), abs=1e-12
        )
        assert got["support"] == want["support"]
    return ours


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iob2_matches_seqeval(iob2, seed):
    pred = _corrupt(iob2, seed)
    ours = _assert_matches_seqeval(iob2, pred)
    assert 0.3 < ours["f1"] < 0.95  # the corruption really changes the score
    assert entity_f1(iob2, iob2)["f1"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_iob1_matches_seqeval(iob1, iob2, seed):
    assert any(t.startswith("B-") for s in iob1 for t in s)  # adjacent same-type entities occur
    assert sum(t.startswith("B-") for s in iob1 for t in s) < sum(
        t.startswith("B-") for s in iob2 for t in s
    )
    _assert_matches_seqeval(iob1, _corrupt(iob1, seed))
    # The same annotation in IOB1 and IOB2 has the same entities.
    assert [get_entities(s) for s in iob1] == [get_entities(s) for s in iob2]


def test_iobes_matches_seqeval(iob2):
    gold = [_to_iobes(s) for s in iob2]
    pred = [_to_iobes(s) for s in _corrupt(iob2, 5)]
    assert any(t.startswith("S-") for s in gold for t in s)
    _assert_matches_seqeval(gold, pred)
    assert [get_entities(s) for s in gold] == [get_entities(s) for s in iob2]


def test_chunks_equal_seqeval_on_random_tag_soup():
    rng = np.random.default_rng(3)
    vocab = ["O", "B", "I", "E", "S"] + [f"{p}-{t}" for p in "BIES" for t in ("A", "B", "C-D")]
    for _ in range(2000):
        seq = list(rng.choice(vocab, size=rng.integers(0, 12)))
        assert get_entities(seq) == sq_get_entities(seq), seq


def test_hand_examples():
    # IOB1: I- after O starts an entity, B- separates adjacent same-type entities,
    # a type change starts a new entity.
    tags = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "B-ORG", "I-ORG"]
    assert get_entities(tags) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 5, 5), ("ORG", 6, 7)
    ]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-MISC"]]
    res = entity_f1(gold, pred)
    # gold: PER, LOC, ORG; pred: PER, ORG (wrong span), ORG, MISC -> 2 correct of 4 predicted.
    assert res["precision"] == pytest.approx(2 / 4)
    assert res["recall"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert res["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert res["per_type"]["ORG"]["precision"] == pytest.approx(1 / 2)
    assert res["per_type"]["MISC"]["support"] == 0
    # A padding sentence (weight 0) is ignored.
    padded = entity_f1([*gold, ["B-PER"]], [*pred, ["O"]], weights=[1, 1, 0])
    assert padded == res
    with pytest.raises(ValueError, match="tag"):
        get_entities(["B-PER", "X-PER"])
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O", "O"]], [["O"]])


def test_subword_to_word_tags():
    # [CLS] New York ##er lives [SEP] [PAD]: word 1 ("Yorker") has two subwords.
    word_ids = [None, 0, 1, 1, 2, None, None]
    preds = [0, 1, 2, 4, 0, 3, 3]
    id2label = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert subword_to_word_tags(preds, word_ids, id2label) == ["B-LOC", "I-LOC", "O"]
    names = [id2label[p] for p in preds]
    assert subword_to_word_tags(names, word_ids) == ["B-LOC", "I-LOC", "O"]
    # The fourth word was truncated away.
    assert subword_to_word_tags(preds, word_ids, id2label, num_words=4)[-1] == "O"
    with pytest.raises(ValueError, match="no token"):
        subword_to_word_tags(preds, word_ids, id2label, num_words=4, missing_tag=None)


def test_tags_from_label_ids():
    id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    labels = np.array([[-100, 1, 2, -100, 0, -100], [-100, 0, -100, -100, -100, -100]])
    preds = np.array([[0, 1, 0, 2, 0, 1], [1, 1, 2, 2, 2, 2]])
    gold, pred = tags_from_label_ids(preds, labels, id2label)
    assert gold == [["B-PER", "I-PER", "O"], ["O"]]
    assert pred == [["B-PER", "O", "O"], ["B-PER"]]
