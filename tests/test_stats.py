"""The decision rule's intervals against independent references, and its words."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from increlora.runner.stats import bootstrap_interval, paired_interval, t_interval, word


def test_t_interval_matches_the_textbook_value() -> None:
    diffs = [0.019, 0.009, -0.017]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t975_2 = 4.302652729911275  # t(0.975, 2 degrees of freedom), from a table
    low, high = t_interval(diffs)
    assert low == pytest.approx(mean - t975_2 * sd / math.sqrt(3))
    assert high == pytest.approx(mean + t975_2 * sd / math.sqrt(3))
    assert t_interval([0.1]) is None


def test_bootstrap_interval_matches_a_plain_loop() -> None:
    diffs = [0.01, -0.02, 0.03, 0.005, 0.0]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 5, (10_000, 5))
    means = sorted(sum(diffs[i] for i in row) / 5 for row in picks.tolist())
    low, high = bootstrap_interval(diffs)
    assert low == pytest.approx(np.percentile(means, 2.5))
    assert high == pytest.approx(np.percentile(means, 97.5))
    assert min(diffs) <= low < high <= max(diffs)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ((0.001, 0.03), "wins"),
        ((0.001, 0.005), "wins"),  # shown above zero, even if small
        ((-0.03, -0.002), "loses"),
        ((-0.008, 0.009), "ties"),
        ((-0.012, 0.004), "inconclusive"),  # a loss of more than a point is not excluded
        ((-0.05, 0.05), "inconclusive"),
        (None, "inconclusive"),
    ],
)
def test_words(interval, expected) -> None:
    assert word(interval) == expected


def test_paired_interval_uses_the_union_and_flags_few_seeds() -> None:
    tight = paired_interval([0.002, 0.003, 0.001, 0.002, 0.004])
    assert tight.word == "wins" and not tight.preliminary and tight.label == "wins"
    assert tight.union[0] == min(tight.t_interval[0], tight.bootstrap_interval[0])
    three = paired_interval([0.019, 0.009, -0.017])
    assert three.word == "inconclusive" and three.label == "inconclusive (preliminary, 3 seeds)"
    level = paired_interval([0.001, -0.002, 0.0, 0.002, -0.001, 0.001])
    assert level.word == "ties"
