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
  keys = ('pred', 'top5', 'loss')
  if not pending:
    return {k: np.zeros(0) for k in keys + ('label',)}
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
  return {k: v.reshape(-1)[mask] for k, v in local.items()}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels.astype(np.int64), preds.astype(np.int64)), 1)
  return m


def metrics(outputs: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict[str, Any]:
  """accuracy, top-5 (top-min(5, classes)), mean loss, per-class accuracy, confusion matrix."""
  labels, preds = outputs['label'], outputs['pred']
  n = len(labels)
  conf = confusion_matrix(labels, preds, len(class_names))
  support = conf.sum(1)
  per_class = [float(conf[i, i] / support[i]) if support[i] else None for i in range(len(support))]
  return {
      'count': int(n),
      'accuracy': float((labels == preds).mean()) if n else 0.0,
      # With <= 5 classes top-5 is trivially 100%; None says "not informative" instead.
      'top5': float(np.mean(outputs['top5'])) if n and len(class_names) > 5 else None,
      'loss': float(np.mean(outputs['loss'])) if n else 0.0,
      'per_class': per_class,
      'confusion': conf.tolist(),
      'class_names': list(class_names),
  }


def scalars(m: Mapping[str, Any]) -> dict[str, float]:
  return {k: m[k] for k in ('accuracy', 'top5', 'loss') if m.get(k) is not None}


def evaluate(config, workdir: str) -> dict[str, Any]:
  """`--mode=eval`: the latest (or best) checkpoint of `workdir` on `config.eval.split`."""
  from tljax import components, report, steps
  from tljax.checkpoint import Checkpointer
  from tljax.data import augment, batching
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
  transform = lambda key, x: augment.eval_transform(x, pp.input_size, pp, dtype=dtype)
  fns = steps.build_steps(eval_apply=steps.on_images(model, transform), loss_kind=config.loss.kind)
  eval_bs = config.eval_batch_size or config.batch_size
  outputs = collect(fns['eval'], steps.replicate(state), batching.eval_batches(splits[split], eval_bs))
  result = metrics(outputs, class_names)
  result.update(split=split, checkpoint=config.eval.checkpoint, step=meta.get('step'))
  if jax.process_index() != 0:
    return result
  with open(os.path.join(workdir, f'eval_{split}.json'), 'w') as f:
    f.write(report.dumps(result, indent=2))
  report.plot_confusion(workdir, f'eval_{split}', np.asarray(result['confusion']), class_names)
  top5 = f'top-5 {100 * result["top5"]:.2f}%  ' if result['top5'] is not None else ''
  print(f'{split} ({config.eval.checkpoint} checkpoint, step {meta.get("step")}): '
        f'accuracy {100 * result["accuracy"]:.2f}%  {top5}loss {result["loss"]:.4f}  '
        f'({result["count"]} examples)')
  return result


def _weights_meta(config) -> dict | None:
  """Preprocessing of a 'dir' source comes from its metadata; read that JSON only."""
  if config.pretrained.source != 'dir' or config.preprocessing:
    return None
  from tljax.porting import weights_io
  return weights_io.load_metadata(config.pretrained.path)
