"""``mlbuild.profile.histogram.LatencyHistogram``: percentiles, min, max and mean within
the stated relative precision of the exact (sorted-list, nearest-rank) ones, merging,
fixed memory."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from mlbuild.profile.histogram import HOUR_US, LatencyHistogram

QS = (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99, 100)


def exact(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with ceil(q% of n) values <= it."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


def datasets(rng: random.Random):
    n = 20_000
    yield "lognormal latencies (us)", [int(rng.lognormvariate(9, 1.2)) for _ in range(n)]
    yield "uniform 1 us .. 1 h", [rng.randint(1, HOUR_US) for _ in range(n)]
    yield "small ints", [rng.randint(0, 3000) for _ in range(n)]
    yield "bimodal", [rng.choice((rng.randint(900, 1100), rng.randint(40_000, 60_000)))
                      for _ in range(n)]
    yield "one value", [123_456] * 1000


@pytest.mark.parametrize("digits", [2, 3])
def test_percentiles_within_precision(digits):
    rng = random.Random(17)
    for name, values in datasets(rng):
        h = LatencyHistogram(significant_digits=digits)
        for v in values:
            h.record(v)
        ordered = sorted(values)
        got = h.percentiles(QS)
        for q, g in zip(QS, got):
            want = exact(ordered, q)
            assert abs(g - want) <= want * h.precision + 0.5, (name, q, g, want)
        assert h.total == len(values)
        for got_, want in ((h.min, ordered[0]), (h.max, ordered[-1]),
                           (h.mean, sum(values) / len(values))):
            assert abs(got_ - want) <= want * h.precision + 0.5, (name, got_, want)


def test_precision_is_what_the_digits_promise():
    assert LatencyHistogram(3).precision <= 0.5e-3
    assert LatencyHistogram(2).precision <= 0.5e-2
    assert LatencyHistogram(1).precision <= 0.5e-1


def test_small_values_are_exact():
    h = LatencyHistogram()
    for v in range(2048):
        h.record(v)
    assert h.percentile(50) == 1023
    assert h.percentile(100) == 2047
    assert h.percentile(0) == 0


def test_every_bucket_holds_its_values_and_is_narrow_enough():
    h = LatencyHistogram(3)
    half = 1 << (h.bits - 1)
    rng = random.Random(3)
    values = list(range(5000)) + [rng.randint(1, HOUR_US) for _ in range(5000)] + [HOUR_US]
    for v in values:
        low, high = h._bounds(h._index(v))
        assert low <= v <= high
        assert high - low + 1 <= max(1, low // half)
    assert h._index(HOUR_US) == len(h.counts) - 1


def test_merge_is_recording_everything_in_one():
    rng = random.Random(5)
    parts = [[int(rng.expovariate(1 / 5000)) for _ in range(3000)] for _ in range(3)]
    merged, whole = LatencyHistogram(), LatencyHistogram()
    for part in parts:
        h = LatencyHistogram()
        for v in part:
            h.record(v)
            whole.record(v)
        merged.merge(h)
    merged.merge(LatencyHistogram())  # an empty share changes nothing
    assert merged.counts == whole.counts
    assert merged.total == whole.total == 9000
    assert merged.percentiles(QS) == whole.percentiles(QS)


def test_merge_refuses_another_layout():
    with pytest.raises(ValueError):
        LatencyHistogram(3).merge(LatencyHistogram(2))


def test_fixed_memory_and_clamping():
    h = LatencyHistogram(highest=1_000_000)
    size = len(h.counts)
    for v in (5, 2_000_000, 10**12, -3):
        h.record(v)
    assert len(h.counts) == size and h.total == 4
    assert h.max == pytest.approx(1_000_000, rel=h.precision)  # counted as the highest
    assert h.min == 0                                            # negative ones as 0
    assert h.percentile(100) == h.max
    assert len(LatencyHistogram().counts) == 23_221  # 3 digits, 1 us .. 1 h: 181 KiB


def test_empty_reset_and_pickle():
    h = LatencyHistogram()
    assert h.percentiles([50, 99]) == [0.0, 0.0] and h.mean == h.min == h.max == 0.0
    assert repr(h) == "LatencyHistogram(empty)"
    for v in (10, 20, 30):
        h.record(v)
    copy = pickle.loads(pickle.dumps(h))
    assert copy.counts == h.counts and copy.percentile(50) == 20
    h.reset()
    assert h.total == 0 and h.percentile(99) == 0.0 and not any(h.counts)
    with pytest.raises(ValueError):
        copy.percentile(101)
