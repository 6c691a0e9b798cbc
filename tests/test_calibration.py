"""Temperature scaling recovers a known temperature and never makes the NLL worse.

Synthetic logits with a known answer: labels are drawn from softmax(z) (so z
is calibrated by construction) and the model reports z * 3, three times too
sharp, so the right temperature is 3; reporting z itself needs none.
"""

import math

import numpy as np
import pytest

from tljax import calibration, evaluate, steps


def _synthetic(true_t, n=4000, k=5, seed=0, scale=2.0):
  """Logits `z * true_t` whose labels were sampled from softmax(z)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, k)) * scale
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = np.array([rng.choice(k, p=row) for row in p])
  return z * true_t, labels


def _synthetic_sigmoid(true_t, n=4000, seed=1):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 1)) * 2.0
  labels = (rng.random(n) < 1 / (1 + np.exp(-z[:, 0]))).astype(np.int32)
  return z * true_t, labels


def test_recovers_a_known_temperature_and_improves_nll_and_ece():
  logits, labels = _synthetic(3.0)
  t = calibration.fit_temperature(logits, labels)
  assert t == pytest.approx(3.0, rel=0.08)
  r = calibration.calibration_report(logits, labels)
  assert r['temperature'] == t and r['reason'] is None and r['count'] == len(labels)
  assert r['nll_after'] <= r['nll_before'] - 0.05
  assert r['ece_after'] < 0.5 * r['ece_before']
  assert r['ece_after'] < 0.03


def test_the_fit_is_the_nll_minimum_to_the_tolerance():
  logits, labels = _synthetic(3.0, n=1000)
  t = calibration.fit_temperature(logits, labels)
  nll = lambda x: calibration._nll(np.asarray(logits, np.float64), labels, 'softmax', x)
  for nearby in (t * 0.99, t * 1.01, t * 0.9, t * 1.1):
    assert nll(t) <= nll(nearby)


def test_already_calibrated_logits_keep_a_temperature_near_one():
  logits, labels = _synthetic(1.0, seed=3)
  assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_under_confident_logits_get_sharpened():
  logits, labels = _synthetic(0.5, seed=4)
  assert calibration.fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.08)


def test_sigmoid_head():
  logits, labels = _synthetic_sigmoid(3.0)
  r = calibration.calibration_report(logits, labels, kind='sigmoid')
  assert r['temperature'] == pytest.approx(3.0, rel=0.1)
  assert r['nll_after'] < r['nll_before'] and r['ece_after'] < r['ece_before']
  calibrated, labels1 = _synthetic_sigmoid(1.0, seed=5)
  assert calibration.fit_temperature(calibrated, labels1, 'sigmoid') == pytest.approx(1.0, abs=0.1)


def test_report_ece_is_the_run_metric_on_scaled_logits():
  """The report's ECE is what evaluate would record for the scaled model."""
  logits, labels = _synthetic(3.0, n=500, seed=6)
  r = calibration.calibration_report(logits, labels)
  scaled = calibration.apply_temperature(logits, r['temperature'])
  conf = np.asarray(steps.predicted_probability(np.asarray(scaled, np.float32), 'softmax'))
  correct = np.argmax(scaled, 1) == labels
  assert r['ece_after'] == pytest.approx(evaluate.expected_calibration_error(conf, correct),
                                         abs=1e-6)
  assert r['accuracy'] == pytest.approx(correct.mean())


def test_apply_temperature_keeps_predictions():
  logits, _ = _synthetic(3.0, n=50)
  assert (np.argmax(calibration.apply_temperature(logits, 2.7), 1) == np.argmax(logits, 1)).all()
  for bad in (0.0, -1.0, math.inf, math.nan):
    with pytest.raises(ValueError, match='temperature'):
      calibration.apply_temperature(logits, bad)


@pytest.mark.parametrize('logits,labels,kind,match', [
    (np.zeros((0, 3)), np.zeros(0, int), 'softmax', 'no examples'),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), 'softmax', 'non-finite'),
    (np.array([[0.0, np.inf], [1.0, 0.0]]), np.array([0, 1]), 'softmax', 'non-finite'),
    (np.zeros((4, 3)), np.array([0, 1, 2]), 'softmax', r'labels must be \[4\]'),
    (np.zeros((2, 3)), np.array([0, 3]), 'softmax', r'lie in \[0, 3\)'),
    (np.zeros((2, 3)), np.array([0, -1]), 'softmax', r'lie in \[0, 3\)'),
    (np.zeros((2, 2)), np.array([0, 1]), 'sigmoid', '1-logit head'),
    (np.zeros((2, 1)), np.array([0, 1]), 'softmax', ">= 2 logits"),
    (np.zeros(4), np.array([0, 1, 0, 1]), 'softmax', r'\[examples, outputs\]'),
    (np.zeros((2, 2)), np.array([0.5, 1.0]), 'softmax', 'whole class indices'),
    (np.zeros((2, 2)), np.array([0, 1]), 'logistic', 'kind='),
])
def test_malformed_inputs_raise_a_clear_error(logits, labels, kind, match):
  with pytest.raises(ValueError, match=match):
    calibration.fit_temperature(logits, labels, kind)


def test_one_class_keeps_t_one_with_the_reason():
  logits, _ = _synthetic(3.0, n=100)
  t, reason = calibration.temperature_fit(logits, np.full(100, 2))
  assert t == 1.0 and 'class 2' in reason
  r = calibration.calibration_report(logits, np.full(100, 2))
  assert r['temperature'] == 1.0 and r['nll_after'] == r['nll_before'] and 'class 2' in r['reason']


def test_separable_split_keeps_t_one_instead_of_the_search_bound():
  """All predictions right with a margin: the NLL falls as T → 0, so no T minimises it."""
  labels = np.arange(60) % 3
  logits = np.eye(3)[labels] * 5.0
  t, reason = calibration.temperature_fit(logits, labels)
  assert t == 1.0 and 'no finite temperature' in reason
  assert calibration.fit_temperature(logits, labels) == 1.0


def test_logits_worse_than_uniform_keep_t_one_and_say_so():
  """Every prediction confidently wrong: the NLL falls as T → ∞ (towards uniform)."""
  labels = np.arange(60) % 3
  logits = np.eye(3)[(labels + 1) % 3] * 5.0
  t, reason = calibration.temperature_fit(logits, labels)
  assert t == 1.0 and 'no better than uniform' in reason, reason
  _, reason = calibration.temperature_fit(np.eye(3)[labels] * 5.0, labels)
  assert 'right with a margin' in reason, reason


def test_a_given_temperature_is_judged_not_refitted():
  """The train loop fits T on val and judges the test split at that T."""
  logits, labels = _synthetic(3.0, n=400)
  r = calibration.calibration_report(logits, labels, temperature=2.0)
  assert r['temperature'] == 2.0 and r['reason'] is None
  assert r['nll_after'] == pytest.approx(calibration._nll(np.asarray(logits, np.float64),
                                                          labels, 'softmax', 2.0))
  with pytest.raises(ValueError, match='temperature'):
    calibration.calibration_report(logits, labels, temperature=0.0)
