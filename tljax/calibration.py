"""Temperature scaling (Guo et al. 2017): one scalar T fitted on held-out logits.

A network trained to low training loss is usually over-confident: its
softmax probabilities exceed its accuracy. Dividing every logit by one T > 0
changes no prediction (the arg-max is the same) but rescales confidence, and
the T that minimises the negative log-likelihood of the validation split is
the one-parameter calibration that Guo et al. found as good as richer maps.

The NLL of `logits / T` is convex in 1/T (a log-sum-exp of functions linear
in 1/T minus a linear term), so it has one minimum along log T; a coarse grid
brackets it and golden-section search narrows it to `TOLERANCE` in log T, all
in float64 numpy. T is searched in [`T_MIN`, `T_MAX`].

Inputs the fit cannot use are told apart from inputs it can but should not:

- malformed ones (no examples, non-finite logits, wrong shapes, labels out of
  range) raise ValueError naming the problem;
- uninformative ones return T = 1 (no change) with the reason: every label of
  one class (the fit would calibrate that class only), or an NLL still falling
  at a search bound (typically every validation prediction correct with a
  margin, where sharpening without limit always lowers the NLL, so no finite
  T minimises it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

T_MIN, T_MAX = 0.05, 20.0
TOLERANCE = 1e-4         # on log T, i.e. a relative tolerance on T
_GRID = 41               # log-spaced coarse grid that brackets the minimum
_GOLDEN = (math.sqrt(5) - 1) / 2
KINDS = ('softmax', 'sigmoid')


def _check(logits, labels, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """float64 logits [n, k] and int64 labels [n], or ValueError saying what is wrong."""
  if kind not in KINDS:
    raise ValueError(f'calibration: kind={kind!r} is invalid; use one of {", ".join(KINDS)}')
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f'calibration: logits must be [examples, outputs], got shape {logits.shape}')
  n, k = logits.shape
  if labels.shape != (n,):
    raise ValueError(f'calibration: labels must be [{n}] for logits {logits.shape}, '
                     f'got shape {labels.shape}')
  if not n:
    raise ValueError('calibration: no examples; fit the temperature on a non-empty split')
  if kind == 'sigmoid' and k != 1:
    raise ValueError(f"calibration: kind='sigmoid' needs a 1-logit head ([n, 1]), got [n, {k}]")
  if kind == 'softmax' and k < 2:
    raise ValueError("calibration: kind='softmax' needs >= 2 logits per example; a 1-logit "
                     "binary head is kind='sigmoid'")
  bad = ~np.isfinite(logits).all(axis=1)
  if bad.any():
    raise ValueError(f'calibration: {int(bad.sum())} of {n} examples have non-finite logits '
                     f'(first: example {int(np.flatnonzero(bad)[0])}); the model diverged or '
                     'its inputs are broken')
  if not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise ValueError('calibration: labels must be whole class indices')
  labels = labels.astype(np.int64)
  classes = 2 if kind == 'sigmoid' else k
  if labels.min() < 0 or labels.max() >= classes:
    raise ValueError(f'calibration: labels must lie in [0, {classes}) for {kind} logits '
                     f'[n, {k}], got {labels.min()}..{labels.max()}')
  return logits, labels


def _nll(logits: np.ndarray, labels: np.ndarray, kind: str, temperature: float) -> float:
  """Mean negative log-likelihood of `logits / temperature` (float64, overflow-safe)."""
  z = logits / temperature
  if kind == 'sigmoid':
    sign = 2.0 * labels - 1.0
    return float(np.mean(np.logaddexp(0.0, -sign * z[:, 0])))
  top = z.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  return float(np.mean(lse - z[np.arange(len(z)), labels]))


def _golden(f, lo: float, hi: float, tol: float) -> float:
  """Minimiser of a unimodal `f` on [lo, hi] to within `tol`."""
  a, b = lo, hi
  c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
  fc, fd = f(c), f(d)
  while b - a > tol:
    if fc <= fd:
      b, d, fd = d, c, fc
      c = b - _GOLDEN * (b - a)
      fc = f(c)
    else:
      a, c, fc = c, d, fd
      d = a + _GOLDEN * (b - a)
      fd = f(d)
  return (a + b) / 2


def temperature_fit(logits, labels, kind: str = 'softmax') -> tuple[float, str | None]:
  """(T, None) for the T minimising the NLL of `logits / T`, or (1.0, reason) when the
  inputs cannot identify one (see the module docstring); ValueError for malformed inputs."""
  logits, labels = _check(logits, labels, kind)
  if np.all(labels == labels[0]):
    return 1.0, (f'every one of the {len(labels)} labels is class {int(labels[0])}: a temperature '
                 'fitted to one class would not calibrate the others; T = 1 kept')
  f = lambda log_t: _nll(logits, labels, kind, math.exp(log_t))
  grid = np.linspace(math.log(T_MIN), math.log(T_MAX), _GRID)
  values = [f(g) for g in grid]
  best = int(np.argmin(values))
  if best in (0, _GRID - 1):
    why = ('sharpening without limit: every validation prediction is right with a margin'
           if best == 0 else 'flattening without limit: the logits do no better than uniform '
           'probabilities on the validation split')
    return 1.0, (f'the NLL keeps falling toward T = {math.exp(grid[best]):g} ({why}): no finite '
                 'temperature minimises it; T = 1 kept')
  log_t = _golden(f, grid[best - 1], grid[best + 1], TOLERANCE)
  return math.exp(log_t), None


def fit_temperature(logits, labels, kind: str = 'softmax') -> float:
  """The T > 0 minimising the validation NLL of `logits / T`; 1.0 for uninformative inputs.

  `logits`: [n, classes] for kind='softmax', [n, 1] for a 'sigmoid' binary
  head; `labels`: [n] class indices ({0, 1} for sigmoid). Use
  `temperature_fit` (or `calibration_report`) to learn why T = 1 was kept.
  """
  return temperature_fit(logits, labels, kind)[0]


def apply_temperature(logits, temperature: float):
  """`logits / temperature` (numpy or jax arrays alike); predictions are unchanged."""
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f'calibration: temperature must be finite and > 0, got {temperature!r}')
  return logits / temperature


def _confidence_and_correct(logits: np.ndarray, labels: np.ndarray, kind: str):
  """The eval step's confidence (`steps.predicted_probability`) and whether the pick is right."""
  import jax.numpy as jnp
  from tljax import steps
  x = jnp.asarray(logits, jnp.float32)
  confidence = np.asarray(steps.predicted_probability(x, kind), np.float64)
  correct = np.asarray(steps.predict_classes(x, kind)) == labels
  return confidence, correct


def calibration_report(logits, labels, kind: str = 'softmax', bins: int | None = None,
                       temperature: float | None = None) -> dict[str, Any]:
  """The fitted temperature and what it does to the split's NLL and ECE.

  Returns temperature, reason (None, or why T = 1 was kept), count,
  accuracy (unchanged by T), nll_before/after and ece_before/after; ECE is
  `tljax.evaluate.expected_calibration_error` over the eval step's
  confidence, so these numbers match the run's own `ece` metric. A given
  `temperature` (one fitted on another split) is judged here instead of fitted.
  """
  from tljax import evaluate
  bins = evaluate.ECE_BINS if bins is None else bins
  if temperature is None:
    temperature, reason = temperature_fit(logits, labels, kind)
  else:
    apply_temperature(np.zeros(1), temperature)   # the same check as everywhere T is used
    reason = None
  logits, labels = _check(logits, labels, kind)
  out: dict[str, Any] = {'kind': kind, 'temperature': temperature, 'reason': reason,
                         'count': int(len(labels))}
  for when, t in (('before', 1.0), ('after', temperature)):
    confidence, correct = _confidence_and_correct(logits / t, labels, kind)
    out[f'nll_{when}'] = _nll(logits, labels, kind, t)
    out[f'ece_{when}'] = evaluate.expected_calibration_error(confidence, correct, bins=bins)
    out['accuracy'] = float(np.mean(correct))
  return out
