"""Mean ± confidence interval over seeds, and paired differences between arms.

On a few hundred images one run ranks nothing: two arms of a transfer recipe
often differ by less than one arm moves between seeds. So every comparison
is an interval over seeds (Student t, n - 1 degrees of freedom), and where two
arms ran the same seeds, the interval of their per-seed differences, which
cancels what a seed shares between arms (data order, the few-shot draw) and
is usually much narrower than the two arms' own intervals.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Interval:
  """`mean` ± `half_width` over `n` values; the half width is NaN below two values."""

  n: int
  mean: float
  half_width: float
  confidence: float = 0.95

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width

  def format(self, scale: float = 100.0, digits: int = 1) -> str:
    """'87.3 ± 1.2 (n=3)'; values are scaled first (accuracies as percent by default)."""
    if self.n == 0:
      return 'n/a (n=0)'
    mean = f'{self.mean * scale:.{digits}f}'
    if math.isnan(self.half_width):
      return f'{mean} (n={self.n}, no interval)'
    return f'{mean} ± {self.half_width * scale:.{digits}f} (n={self.n})'


def _finite(values: Iterable[float], what: str) -> np.ndarray:
  array = np.asarray(list(values), np.float64)
  if array.ndim != 1:
    raise ValueError(f'{what}: expected a flat list of numbers, got shape {array.shape}')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{what}: {array.tolist()} holds NaN or inf; leave failed runs out instead')
  return array


def mean_ci(values: Iterable[float], confidence: float = 0.95, what: str = 'values') -> Interval:
  """Student-t interval of the mean: mean ± t(1 - (1 - confidence) / 2, n - 1) · s / √n."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  array = _finite(values, what)
  n = len(array)
  if n == 0:
    return Interval(0, math.nan, math.nan, confidence)
  if n == 1:
    return Interval(1, float(array[0]), math.nan, confidence)
  t = scipy_stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)
  half = float(t * array.std(ddof=1) / math.sqrt(n))
  return Interval(n, float(array.mean()), half, confidence)


@dataclasses.dataclass(frozen=True)
class Paired:
  """Per-seed `a - b` over the seeds both arms finished, and how often `a` came out ahead."""

  difference: Interval
  wins: int
  ties: int
  losses: int
  seeds: tuple


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95,
           tie: float = 0.0) -> Paired:
  """Compares arm `a` with arm `b` ({seed: metric} each) on their common seeds.

  A difference within `tie` of zero counts as a tie (with accuracies on a
  small split, one example is a natural tie width).
  """
  seeds = tuple(sorted(set(a) & set(b)))
  diffs = _finite((a[s] - b[s] for s in seeds), 'paired differences')
  return Paired(mean_ci(diffs, confidence, 'paired differences'),
                wins=int(np.sum(diffs > tie)), ties=int(np.sum(np.abs(diffs) <= tie)),
                losses=int(np.sum(diffs < -tie)), seeds=seeds)


def separated(a: Interval, b: Interval) -> bool:
  """True when both intervals exist and do not overlap: the only case a table may rank them."""
  if a.n < 2 or b.n < 2:
    return False
  return a.low > b.high or b.low > a.high
