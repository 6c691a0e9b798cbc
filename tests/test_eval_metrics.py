"""Evaluation metrics a sweep reports besides accuracy: ECE, balanced accuracy, per-class PRF.

ECE is checked against bins written out by hand; the rest against sklearn on
an imbalanced case with a class never predicted and a class with no examples;
the eval step's confidence against softmax/sigmoid of fixed logits.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from tljax import evaluate, report, steps

# (confidence, correct) and the 15-bin index each lands in (width 1/15 = 0.0667).
HAND = [
    (1.00, False),  # bin 14 [0.933, 1]: exactly 1.0 joins the last bin
    (0.95, True),   # bin 14 (0.95 * 15 = 14.25)
    (0.52, True),   # bin 7  [0.467, 0.533)
    (0.54, False),  # bin 8  [0.533, 0.600): 10, 14, 16 or 20 bins would merge it with 0.52
    (0.25, False),  # bin 3  [0.200, 0.267)
    (0.75, True),   # bin 11 [0.733, 0.800)
]
# Per bin, (count / n) * |accuracy - mean confidence|:
#   bin 14: 2/6 * |0.5 - 0.975| = 0.95 / 6
#   bin 7:  1/6 * |1 - 0.52|    = 0.48 / 6
#   bin 8:  1/6 * |0 - 0.54|    = 0.54 / 6
#   bin 3:  1/6 * |0 - 0.25|    = 0.25 / 6
#   bin 11: 1/6 * |1 - 0.75|    = 0.25 / 6
HAND_ECE = (0.95 + 0.48 + 0.54 + 0.25 + 0.25) / 6
# Had 1.0 fallen into a bin of its own: |0 - 1| + |1 - 0.95| instead of 0.95 for bin 14.
HAND_ECE_IF_ONE_ALONE = (1.0 + 0.05 + 0.48 + 0.54 + 0.25 + 0.25) / 6


def hand_arrays():
  confidence = np.array([c for c, _ in HAND], np.float32)
  correct = np.array([ok for _, ok in HAND])
  return confidence, correct


def test_ece_matches_hand_computed_bins():
  confidence, correct = hand_arrays()
  assert evaluate.expected_calibration_error(confidence, correct) == pytest.approx(HAND_ECE,
                                                                                   abs=1e-6)
  assert HAND_ECE_IF_ONE_ALONE != pytest.approx(HAND_ECE, abs=1e-3)
  for bins in (10, 14, 16, 20):   # the case tells 15 bins from its neighbours
    other = evaluate.expected_calibration_error(confidence, correct, bins=bins)
    assert other != pytest.approx(HAND_ECE, abs=1e-3), bins


def test_ece_through_metrics_and_its_extremes():
  confidence, correct = hand_arrays()
  labels = np.zeros(len(HAND), np.int32)
  preds = np.where(correct, 0, 1).astype(np.int32)
  m = evaluate.metrics(outputs(labels, preds, confidence), ['a', 'b'])
  assert m['ece'] == pytest.approx(HAND_ECE, abs=1e-6)
  # Always right at confidence 1, or right half the time at 0.5: perfectly calibrated.
  assert evaluate.expected_calibration_error(np.ones(4), np.ones(4, bool)) == 0.0
  assert evaluate.expected_calibration_error(np.full(4, 0.5),
                                             np.array([1, 0, 1, 0], bool)) == 0.0
  assert evaluate.expected_calibration_error(np.ones(4), np.zeros(4, bool)) == 1.0


def outputs(labels, preds, confidence=None):
  n = len(labels)
  confidence = np.full(n, 0.5, np.float32) if confidence is None else confidence
  return {'label': labels, 'pred': preds, 'top5': np.ones(n, bool),
          'loss': np.ones(n, np.float32), 'confidence': confidence}


def imbalanced_case(seed=0, n=200):
  """5 classes: 0-3 skewed, 3 never predicted, 4 absent from the labels but sometimes predicted."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, n, p=[0.6, 0.25, 0.1, 0.05, 0.0]).astype(np.int32)
  guess = rng.choice([0, 1, 2, 4], n, p=[0.5, 0.25, 0.15, 0.1])
  preds = np.where(rng.random(n) < 0.6, labels, guess).astype(np.int32)
  preds[preds == 3] = 0
  return labels, preds


def test_balanced_accuracy_and_prf_match_sklearn_on_an_imbalanced_case():
  labels, preds = imbalanced_case()
  assert 3 in labels and 3 not in preds and 4 not in labels and 4 in preds
  names = [f'c{i}' for i in range(5)]
  m = evaluate.metrics(outputs(labels, preds), names)

  with pytest.warns(UserWarning, match='y_pred contains classes not in y_true'):
    want_balanced = skm.balanced_accuracy_score(labels, preds)
  assert m['balanced_accuracy'] == pytest.approx(want_balanced, abs=1e-12)
  assert m['balanced_accuracy'] != pytest.approx(m['accuracy'], abs=1e-3)
  assert m['balanced_accuracy'] == pytest.approx(
      np.mean([r for r in m['per_class'] if r is not None]), abs=1e-12)

  p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=range(5), zero_division=0)
  np.testing.assert_allclose(m['precision'], p, atol=1e-12)
  np.testing.assert_allclose(m['recall'], r, atol=1e-12)
  np.testing.assert_allclose(m['f1'], f, atol=1e-12)
  # The same numbers from the confusion matrix, 0 where the ratio is undefined.
  conf = np.asarray(m['confusion'], float)
  tp, predicted, support = np.diag(conf), conf.sum(0), conf.sum(1)
  precision = np.divide(tp, predicted, out=np.zeros(5), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros(5), where=support > 0)
  np.testing.assert_allclose(m['precision'], precision, atol=1e-12)
  np.testing.assert_allclose(m['recall'], recall, atol=1e-12)
  assert m['precision'][3] == 0.0 and m['recall'][4] == 0.0 and m['per_class'][4] is None

  present = [0, 1, 2, 3]
  want_f1 = skm.f1_score(labels, preds, labels=present, average='macro', zero_division=0)
  assert m['macro_f1'] == pytest.approx(want_f1, abs=1e-12)
  # Class 4 (no examples) does not vote: averaging all five would differ.
  assert m['macro_f1'] != pytest.approx(np.mean(m['f1']), abs=1e-3)
  assert all(type(x) is float for key in ('precision', 'recall', 'f1') for x in m[key])


def test_scalars_log_the_new_summary_numbers():
  labels, preds = imbalanced_case(seed=1)
  m = evaluate.metrics(outputs(labels, preds), [f'c{i}' for i in range(5)])
  logged = evaluate.scalars(m)
  assert set(logged) == {'accuracy', 'loss', 'balanced_accuracy', 'ece', 'macro_f1'}
  assert logged['ece'] == m['ece']
  assert 'top5' in evaluate.scalars(evaluate.metrics(outputs(labels, preds),
                                                     [f'c{i}' for i in range(6)]))


def test_empty_outputs_give_zeros_not_errors():
  empty = evaluate.collect(None, None, [])
  assert set(empty) == {'pred', 'top5', 'loss', 'confidence', 'label'}
  m = evaluate.metrics(empty, ['a', 'b', 'c'])
  assert m['count'] == 0
  for key in ('accuracy', 'balanced_accuracy', 'ece', 'macro_f1', 'loss'):
    assert m[key] == 0.0, key
  assert m['top5'] is None and m['per_class'] == [None] * 3
  assert m['precision'] == m['recall'] == m['f1'] == [0.0] * 3
  assert json.loads(report.dumps(m)) == m
  assert set(evaluate.scalars(m)) == {'accuracy', 'loss', 'balanced_accuracy', 'ece', 'macro_f1'}


def fixed_logits_apply(logits):
  def apply(params, batch_stats, batch, cache, keys, train):
    return jnp.asarray(logits, jnp.float32), None
  return apply


def run_eval_step(logits, labels, kind):
  state = steps.TrainState({}, {}, None, np.zeros((), np.int32), None)
  out = steps.eval_step(state, {'label': jnp.asarray(labels, jnp.int32)},
                        apply_fn=fixed_logits_apply(logits), loss_kind=kind)
  return jax.device_get(out)


def test_softmax_confidence_is_the_predicted_class_probability():
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 3.0], [50.0, -50.0, 0.0]])
  out = run_eval_step(logits, [0, 1, 2, 0], 'softmax')
  e = math.exp
  want = [1 / (1 + e(-1) + e(-2)), 1 / 3, 1 / (2 + e(-4)), 1.0]
  assert out['confidence'].dtype == np.float32
  np.testing.assert_allclose(out['confidence'], want, rtol=1e-6)
  np.testing.assert_array_equal(out['pred'], [0, 0, 1, 0])
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
  np.testing.assert_allclose(out['confidence'], probs[np.arange(4), out['pred']], rtol=1e-6)


def test_sigmoid_confidence_is_max_of_p_and_one_minus_p():
  logits = np.array([[2.0], [-3.0], [0.0], [40.0], [-40.0]])
  out = run_eval_step(logits, [1, 0, 1, 1, 1], 'sigmoid')
  sigmoid = lambda x: 1 / (1 + math.exp(-x))
  want = [sigmoid(2.0), 1 - sigmoid(-3.0), 0.5, 1.0, 1.0]
  assert out['confidence'].dtype == np.float32
  np.testing.assert_allclose(out['confidence'], want, rtol=1e-6)
  np.testing.assert_array_equal(out['pred'], [1, 0, 0, 1, 0])
  assert np.all(out['confidence'] >= 0.5)


def test_collect_carries_confidence_and_drops_padding():
  """The pmapped step and the host masking keep confidence aligned with its example."""
  devices = jax.local_device_count()
  n_real = devices - 1
  logits = np.random.default_rng(0).standard_normal((devices, 1, 4)).astype(np.float32)
  fns = steps.build_steps(eval_apply=lambda params, bs, batch, cache, keys, train:
                          (batch['feature'], None), loss_kind='softmax')
  mask = np.arange(devices) < n_real
  batch = {'feature': logits, 'label': np.zeros((devices, 1), np.int32),
           'mask': mask.reshape(devices, 1)}
  state = steps.replicate(steps.TrainState({}, {}, None, np.zeros((), np.int32), None))
  got = evaluate.collect(fns['eval'], state, [batch])
  assert len(got['confidence']) == n_real
  want = np.asarray(jax.nn.softmax(jnp.asarray(logits[:n_real, 0]))).max(-1)
  np.testing.assert_allclose(got['confidence'], want, rtol=1e-6)


def test_summary_shows_the_new_metrics_and_stays_strict_json(tmp_path):
  labels, preds = imbalanced_case(seed=2, n=60)
  names = [f'class_{i}' for i in range(5)]
  val = evaluate.metrics(outputs(labels, preds), names)
  old = {k: val[k] for k in ('count', 'accuracy', 'top5', 'loss', 'per_class', 'confusion',
                             'class_names')}   # a record written before these metrics existed
  summary = {'title': 't', 'phases': [
      {'name': 'head', 'trainable': 'head', 'epochs': 2, 'seconds': 1.0, 'val': old},
      {'name': 'finetune', 'trainable': 'all', 'epochs': 3, 'seconds': 2.0, 'val': val,
       'test': val}], 'final': {'val': val, 'test': val}, 'notes': []}
  text = report.write_summary(str(tmp_path), summary)
  assert '| balanced acc | macro-F1 | ECE |' in text
  assert '| head | head | 2 | val |' in text
  assert f'| finetune | all | 3 | val | {100 * val["accuracy"]:.2f}% | ' \
         f'{100 * val["balanced_accuracy"]:.2f}% | {100 * val["macro_f1"]:.2f}% | ' \
         f'{100 * val["ece"]:.2f}% |' in text
  assert '|  |  |  | test |' in text
  row = next(line for line in text.splitlines() if line.startswith('| class_4 |'))
  assert row.count('| 0 | ') == 2 and '—' in row   # no examples: recall undefined
  assert 'val precision | val recall | val F1' in text
  saved = json.load(open(tmp_path / 'summary.json'))
  assert saved['final']['test']['f1'] == val['f1']
  assert saved['final']['val']['ece'] == val['ece']
