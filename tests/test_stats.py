"""Intervals over seeds and paired differences, checked against hand-computed cases."""

import math

import pytest

from tljax import stats

T_975_2 = 4.302652729911275   # Student t, 97.5th percentile, 2 degrees of freedom (tables)


def test_mean_ci_matches_the_hand_computed_interval():
  # mean 0.85, sample sd 0.05, se 0.05 / sqrt(3)
  ci = stats.mean_ci([0.80, 0.85, 0.90])
  assert ci.n == 3
  assert ci.mean == pytest.approx(0.85)
  assert ci.half_width == pytest.approx(T_975_2 * 0.05 / math.sqrt(3), rel=1e-9)
  assert (ci.low, ci.high) == pytest.approx((0.85 - 0.12421, 0.85 + 0.12421), abs=1e-5)
  assert ci.format() == '85.0 ± 12.4 (n=3)'


def test_wider_confidence_gives_a_wider_interval():
  values = [0.7, 0.72, 0.75, 0.71]
  assert stats.mean_ci(values, 0.99).half_width > stats.mean_ci(values, 0.95).half_width


def test_too_few_values_have_no_interval():
  assert stats.mean_ci([]).n == 0 and math.isnan(stats.mean_ci([]).mean)
  one = stats.mean_ci([0.9])
  assert one.mean == 0.9 and math.isnan(one.half_width)
  assert one.format() == '90.0 (n=1, no interval)'


def test_non_finite_values_are_refused_with_the_fix():
  with pytest.raises(ValueError, match='leave failed runs out'):
    stats.mean_ci([0.8, float('nan')])
  with pytest.raises(ValueError, match='confidence'):
    stats.mean_ci([0.8, 0.9], confidence=95)


def test_paired_difference_uses_common_seeds_only():
  a = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.70}
  b = {0: 0.85, 1: 0.80, 2: 0.80, 4: 0.60}
  result = stats.paired(a, b)
  assert result.seeds == (0, 1, 2)
  # differences 0.05, 0, 0.05: mean 1/30, sample sd 0.05 / sqrt(3)
  assert result.difference.mean == pytest.approx(0.05 * 2 / 3)
  se = (0.05 / math.sqrt(3)) / math.sqrt(3)
  assert result.difference.half_width == pytest.approx(T_975_2 * se)
  assert (result.wins, result.ties, result.losses) == (2, 1, 0)


def test_tie_width():
  result = stats.paired({0: 0.81, 1: 0.70}, {0: 0.80, 1: 0.75}, tie=0.02)
  assert (result.wins, result.ties, result.losses) == (0, 1, 1)


def test_only_separated_intervals_rank():
  low = stats.mean_ci([0.70, 0.71, 0.72])
  high = stats.mean_ci([0.80, 0.81, 0.82])
  wide = stats.mean_ci([0.60, 0.80, 0.95])
  assert stats.separated(low, high) and stats.separated(high, low)
  assert not stats.separated(low, wide)
  assert not stats.separated(low, stats.mean_ci([0.9]))
