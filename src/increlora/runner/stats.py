"""The decision rule of docs/benchmark.md: paired 95% intervals and the words they allow.

For per-seed differences (method minus reference, paired by seed) the rule takes the union of
the t-interval and the paired bootstrap percentile interval, and words it with a margin of
one point: *wins* (above 0), *loses* (below 0), *ties* (inside +-margin), *inconclusive*
(anything else). Fewer than ``MIN_SEEDS`` seeds make the word *preliminary*.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

MARGIN = 0.01
MIN_SEEDS = 5
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedInterval:
    """The mean paired difference, its two 95% intervals and the rule's word."""

    n: int
    mean: float
    t_interval: tuple[float, float] | None  # None with one seed
    bootstrap_interval: tuple[float, float] | None
    word: str  # wins / loses / ties / inconclusive
    preliminary: bool  # fewer than MIN_SEEDS seeds

    @property
    def union(self) -> tuple[float, float] | None:
        if self.t_interval is None or self.bootstrap_interval is None:
            return None
        return (
            min(self.t_interval[0], self.bootstrap_interval[0]),
            max(self.t_interval[1], self.bootstrap_interval[1]),
        )

    @property
    def label(self) -> str:
        """The word as a report prints it (``inconclusive (preliminary, 3 seeds)``)."""
        return f"{self.word} (preliminary, {self.n} seeds)" if self.preliminary else self.word


def t_interval(diffs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """mean +- t(1 - (1 - confidence) / 2, n - 1) * sd / sqrt(n); None for fewer than 2."""
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(scipy_stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * sd / n**0.5
    return mean - half, mean + half


def bootstrap_interval(
    diffs: list[float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval of the mean over ``resamples`` resamples of the seeds (with
    replacement; a seeded generator, so the report is reproducible); None for fewer than 2."""
    if len(diffs) < 2:
        return None
    values = np.asarray(diffs, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def word(interval: tuple[float, float] | None, margin: float = MARGIN) -> str:
    """The rule's word for an interval (None, from a single seed: inconclusive)."""
    if interval is None:
        return "inconclusive"
    low, high = interval
    if low > 0:
        return "wins"
    if high < 0:
        return "loses"
    if -margin < low and high < margin:
        return "ties"
    return "inconclusive"


def paired_interval(diffs: list[float], margin: float = MARGIN) -> PairedInterval:
    """Everything the rule needs of one set of paired differences."""
    t_int, boot = t_interval(diffs), bootstrap_interval(diffs)
    result = PairedInterval(
        n=len(diffs),
        mean=statistics.fmean(diffs),
        t_interval=t_int,
        bootstrap_interval=boot,
        word="inconclusive",
        preliminary=len(diffs) < MIN_SEEDS,
    )
    return PairedInterval(**{**result.__dict__, "word": word(result.union, margin)})
