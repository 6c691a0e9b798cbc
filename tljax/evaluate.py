"""Classification metrics over masked, device-sharded eval batches; `--mode=eval`.

Eval batches are padded to a whole number of device batches; the `mask`
says which rows are real, so every example is counted exactly once whatever
the dataset size and device count.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np


def collect(p_eval: Callable, state, batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
  """Runs the pmapped eval step; returns unpadded per-example host arrays of ALL processes.

  Each process holds its slice of every global batch; the fixed-shape
  outputs and masks are gathered across processes before masking, in global
  example order, so every process computes the same metrics over each
  example exactly once (and takes the same best-checkpoint decisions).
  """
  pending = []
  for batch in batches:
    inputs = {k: v for k, v in batch.items() if k in ('image', 'feature', 'label')}
    pending.append((p_eval(state, inputs), np.asarray(batch['label']), np.asarray(batch['mask'])))
  keys = ('pred', 'top5', 'loss', 'confidence')
  if not pending:
    return {k: np.zeros(0) for k in keys + ('label',)}
  keys += ('logits',) if 'logits' in pending[0][0] else ()
  local = {k: np.stack([np.asarray(jax.device_get(out[k])) for out, _, _ in pending])
           for k in keys}
  local['label'] = np.stack([labels for _, labels, _ in pending])
  local['mask'] = np.stack([mask for _, _, mask in pending])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    # [P, steps, D, b, ...] -> [steps, P, D, b, ...]: process p holds rows p*local:(p+1)*local.
    local = {k: np.swapaxes(np.asarray(v), 0, 1)
             for k, v in multihost_utils.process_allgather(local).items()}
  mask = local.pop('mask').reshape(-1)
  rows = {k: v.reshape(mask.size, -1)[mask] for k, v in local.items()}
  # Logits keep their class axis (temperature scaling refits on them).
  return {k: r if k == 'logits' else r[:, 0] for k, r in rows.items()}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels.astype(np.int64), preds.astype(np.int64)), 1)
  return m


ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = ECE_BINS) -> float:
  """Gap between confidence and accuracy, weighted by how many examples sit at each confidence.

  `bins` equal-width bins over [0, 1]; bin i holds confidences in
  [i/bins, (i+1)/bins), and a confidence of exactly 1 joins the last bin.
  ECE = sum over bins of (count / n) * |accuracy - mean confidence|
  (Guo et al. 2017); 0 for no examples.
  """
  confidence = np.asarray(confidence, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  n = len(confidence)
  if not n:
    return 0.0
  index = np.clip(np.floor(confidence * bins).astype(np.int64), 0, bins - 1)
  # Per bin, count * |acc - conf| = |sum(correct - confidence)|.
  gap = np.bincount(index, weights=correct - confidence, minlength=bins)
  return float(np.abs(gap).sum() / n)


def metrics(outputs: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict[str, Any]:
  """accuracy, top-5 (top-min(5, classes)), mean loss, per-class accuracy, confusion matrix,
  and what a sweep compares besides accuracy on imbalanced or few-shot splits:

  - balanced_accuracy: mean per-class recall over the classes that have examples here
    (a class absent from the split has no recall to average);
  - ece: expected calibration error over `ECE_BINS` equal-width confidence bins;
  - precision / recall / f1: per class, in class order (sklearn, 0 where undefined);
  - macro_f1: mean f1 over the same classes as balanced_accuracy.

  No examples give 0.0 for every rate and None for per-class accuracy and top-5.
  """
  labels, preds = outputs['label'], outputs['pred']
  n = len(labels)
  num_classes = len(class_names)
  conf = confusion_matrix(labels, preds, num_classes)
  support = conf.sum(1)
  per_class = [float(conf[i, i] / support[i]) if support[i] else None for i in range(len(support))]
  present = support > 0
  if n:
    from sklearn.metrics import precision_recall_fscore_support
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=list(range(num_classes)), zero_division=0)
  else:
    precision = recall = f1 = np.zeros(num_classes)
  return {
      'count': int(n),
      'accuracy': float((labels == preds).mean()) if n else 0.0,
      # With <= 5 classes top-5 is trivially 100%; None says "not informative" instead.
      'top5': float(np.mean(outputs['top5'])) if n and len(class_names) > 5 else None,
      'loss': float(np.mean(outputs['loss'])) if n else 0.0,
      'balanced_accuracy': float(np.mean(recall[present])) if present.any() else 0.0,
      'ece': expected_calibration_error(outputs['confidence'], labels == preds),
      'macro_f1': float(np.mean(f1[present])) if present.any() else 0.0,
      'per_class': per_class,
      'precision': [float(x) for x in precision],
      'recall': [float(x) for x in recall],
      'f1': [float(x) for x in f1],
      'confusion': conf.tolist(),
      'class_names': list(class_names),
  }


SCALARS = ('accuracy', 'top5', 'loss', 'balanced_accuracy', 'ece', 'macro_f1')


def scalars(m: Mapping[str, Any]) -> dict[str, float]:
  """The one-number metrics that go to metrics.jsonl and TensorBoard."""
  return {k: m[k] for k in SCALARS if m.get(k) is not None}


def evaluate(config, workdir: str) -> dict[str, Any]:
  """`--mode=eval`: the latest (or best) checkpoint of `workdir` on `config.eval.split`.

  `config.eval.tta` picks the views (`tljax.tta`); the result, its JSON and
  the printed line name the mode, so a TTA number is never mistaken for a
  single-view one.
  """
  from tljax import components, report, steps, tta
  from tljax.checkpoint import Checkpointer
  from tljax.data import batching
  from tljax.config import validate
  validate(config)
  pp = components.preprocessing(config, _weights_meta(config))
  splits = components.load_data(config, pp)
  split = config.eval.split
  if split not in splits:
    raise ValueError(f'eval.split={split!r} is not in the data (available: {sorted(splits)}); '
                     'for a test split set data.test_split or data.test_fraction.')
  class_names = splits['train'].class_names
  model = components.create_model(config, components.num_outputs(config, len(class_names)))
  target = components.zero_variables(config, model, pp.input_size)
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, best=config.checkpoint.best)
  variables, meta = ckpt.restore_model(config.eval.checkpoint, target)
  ckpt.close()
  state = steps.TrainState(params=variables['params'], batch_stats=variables['batch_stats'],
                           opt_state=None, step=np.zeros((), np.int64), rng=None)
  dtype = components.compute_dtype(config)
  mode = config.eval.tta
  apply = tta.on_images(model, mode, pp.input_size, pp, config.loss.kind, dtype)
  fns = steps.build_steps(eval_apply=apply, loss_kind=config.loss.kind)
  eval_bs = config.eval_batch_size or config.batch_size
  outputs = collect(fns['eval'], steps.replicate(state), batching.eval_batches(splits[split], eval_bs))
  result = metrics(outputs, class_names)
  result.update(split=split, checkpoint=config.eval.checkpoint, step=meta.get('step'), tta=mode)
  if jax.process_index() != 0:
    return result
  with open(os.path.join(workdir, f'eval_{split}.json'), 'w') as f:
    f.write(report.dumps(result, indent=2))
  report.plot_confusion(workdir, f'eval_{split}', np.asarray(result['confusion']), class_names)
  top5 = f'top-5 {100 * result["top5"]:.2f}%  ' if result['top5'] is not None else ''
  views = f', tta {mode} ({tta.MODES[mode]} views)' if mode != 'none' else ', no tta'
  print(f'{split} ({config.eval.checkpoint} checkpoint, step {meta.get("step")}{views}): '
        f'accuracy {100 * result["accuracy"]:.2f}%  {top5}loss {result["loss"]:.4f}  '
        f'balanced accuracy {100 * result["balanced_accuracy"]:.2f}%  '
        f'macro-F1 {100 * result["macro_f1"]:.2f}%  ECE {100 * result["ece"]:.2f}%  '
        f'({result["count"]} examples)')
  return result


def _weights_meta(config) -> dict | None:
  """Preprocessing of a 'dir' source comes from its metadata; read that JSON only."""
  if config.pretrained.source != 'dir' or config.preprocessing:
    return None
  from tljax.porting import weights_io
  return weights_io.load_metadata(config.pretrained.path)
