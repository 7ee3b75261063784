"""CrowS-Pairs reading, alignment, the authors' counting rules and the bootstrap intervals."""

import csv
import difflib

import numpy as np
import pytest
import scipy.stats

from transformer.metrics.crows_pairs import (
    bootstrap_ci,
    crows_pairs_summary,
    pair_outcomes,
    read_crows_pairs,
    shared_positions,
)


@pytest.fixture(scope="module")
def sample(fixtures):
    return fixtures / "crows_pairs" / "crows_pairs_sample.csv"


def test_reads_the_sample_with_its_columns(sample):
    pairs = read_crows_pairs(sample)
    with open(sample, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(pairs) == len(rows) == 10
    assert [p.sent_more for p in pairs] == [r["sent_more"] for r in rows]
    assert {p.direction for p in pairs} == {"stereo", "antistereo"}
    assert pairs[1].direction == "antistereo" and pairs[1].bias_type == "race-color"


def test_bad_csv_is_a_clear_error(tmp_path, sample):
    lines = sample.read_text(encoding="utf-8").splitlines()
    no_column = tmp_path / "no_column.csv"
    no_column.write_text(lines[0].replace("bias_type", "kind") + "\n" + "\n".join(lines[1:]))
    with pytest.raises(ValueError, match=r"lacks the CrowS-Pairs column\(s\) \['bias_type'\]"):
        read_crows_pairs(no_column)
    bad_direction = tmp_path / "bad_direction.csv"
    bad_direction.write_text("\n".join([lines[0], lines[1].replace(",stereo,", ",sterio,")]))
    with pytest.raises(ValueError, match=r"bad_direction.csv:2: stereo_antistereo is 'sterio'"):
        read_crows_pairs(bad_direction)


def test_shared_positions_are_the_equal_blocks():
    # [CLS] the poor are ignorant [SEP] vs [CLS] the very rich are ignorant [SEP]
    a, b = [2, 10, 11, 12, 13, 3], [2, 10, 20, 21, 12, 13, 3]
    in_a, in_b = shared_positions(a, b)
    assert (in_a, in_b) == ([0, 1, 3, 4, 5], [0, 1, 4, 5, 6])
    assert [a[i] for i in in_a] == [b[i] for i in in_b]
    ops = difflib.SequenceMatcher(None, a, b).get_opcodes()  # The same blocks over the raw ints.
    assert sum(i2 - i1 for op, i1, i2, _, _ in ops if op == "equal") == len(in_a)


def test_outcomes_round_to_three_decimals_like_the_authors():
    more = [-10.0, -12.0, -7.12341, -7.1236, -3.0]
    less = [-11.0, -11.0, -7.12344, -7.1231, -3.0]
    # Higher, lower, equal after rounding (neutral), lower (-7.124 < -7.123), exactly equal.
    np.testing.assert_array_equal(pair_outcomes(more, less), [1, 0, -1, 0, -1])


def test_summary_counts_neutral_pairs_in_the_denominator(sample):
    pairs = read_crows_pairs(sample)[:4]  # stereo, antistereo, stereo, stereo
    more, less = [-1.0, -5.0, -2.0, -3.0], [-2.0, -4.0, -2.0, -1.0]
    summary = crows_pairs_summary(pairs, more, less, num_samples=200)
    overall = summary["overall"]
    assert overall["metric_score"] == 25.0  # 1 preferred of 4 (one neutral).
    assert overall["num_neutral"] == 1 and overall["percent_neutral"] == 25.0
    assert overall["stereo_score"] == 50.0  # Of the 2 non-neutral stereo pairs, 1.
    assert overall["antistereo_score"] == 0.0
    assert summary["by_bias_type"]["race-color"]["num_pairs"] == 2
    assert sum(s["num_pairs"] for s in summary["by_bias_type"].values()) == 4
    with pytest.raises(ValueError, match="4 pairs but 3"):
        crows_pairs_summary(pairs, more[:3], less)


def test_bootstrap_interval_matches_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(1)
    values = (rng.random(400) < 0.6).astype(float)
    low, high = bootstrap_ci(values, num_samples=4000, seed=3)
    ref = scipy.stats.bootstrap((values,), np.mean, n_resamples=4000, confidence_level=0.95,
                                method="percentile", random_state=4).confidence_interval
    assert abs(low - ref.low) < 0.01 and abs(high - ref.high) < 0.01
    p, half = values.mean(), 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert abs(low - (p - half)) < 0.01 and abs(high - (p + half)) < 0.01
    # A direct resampling loop with the same generator gives the same interval exactly.
    gen = np.random.default_rng(3)
    draws = gen.integers(0, len(values), (4000, len(values)))
    means = [values[d].mean() for d in draws]
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)
