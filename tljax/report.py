"""Everything a run leaves in its workdir for a researcher to read.

`config.json` and `metrics.jsonl` make a workdir self-describing; plots and
summary tables are generated from them (never typed by hand), so they can be
rebuilt after the fact and a resumed run's history stays consistent: on
resume the log is truncated back to the checkpoint's line count.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

METRICS_FILE = 'metrics.jsonl'
SUMMARY_JSON = 'summary.json'


def jsonable(x):
  """Plain JSON values; NaN and ±inf become None (use `strict_record` to flag them).

  Python's json writes NaN/Infinity, which no strict JSON parser reads, so a
  diverged run must not be able to put them in a workdir's files.
  """
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def nonfinite_fields(record: Mapping[str, Any]) -> list[str]:
  """Top-level numeric fields holding NaN or ±inf."""
  return sorted(k for k, v in record.items()
                if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)))


def strict_record(record: Mapping[str, Any]) -> dict:
  """`jsonable(record)`, plus `nonfinite: [fields]` when any top-level value was NaN or ±inf."""
  bad = nonfinite_fields(record)
  out = jsonable(dict(record))
  if bad:
    out['nonfinite'] = bad
  return out


def dumps(x, **kw) -> str:
  """Strict JSON text (raises rather than writing NaN)."""
  return json.dumps(jsonable(x), allow_nan=False, **kw)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Reporter:
  """metrics.jsonl + TensorBoard + a plain-text progress bar on stderr.

  In a multi-host job only process 0 writes (`write=False` elsewhere); the
  others still count lines so their bookkeeping matches.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, progress: bool = True,
               write: bool = True):
    self.workdir = workdir
    self._write = write
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    self.lines = len(read_metrics(workdir))
    self._tb = None
    if tensorboard and write:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._progress = progress
    self._tty = sys.stderr.isatty()
    self._bar_start = time.time()

  def write_config(self, config) -> None:
    if not self._write:
      return
    with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  def truncate(self, lines: int) -> None:
    """Drops records written after the checkpoint being resumed from."""
    records = read_metrics(self.workdir)[:lines]
    if not self._write:
      self.lines = lines
      return
    with open(self._path, 'w') as f:
      f.writelines(dumps(r) + '\n' for r in records)
    self.lines = len(records)

  def log(self, record: Mapping[str, Any]) -> None:
    """One JSON line; numeric fields also go to TensorBoard as '<kind>/<field>'."""
    record = strict_record(record)
    if not self._write:
      self.lines += 1
      return
    with open(self._path, 'a') as f:
      f.write(dumps(record) + '\n')
    self.lines += 1
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('step', 'epoch') and isinstance(value, (int, float)):
          self._tb.add_scalar(f'{record.get("kind", "misc")}/{key}', value, record['step'])
      self._tb.flush()

  def start_epoch(self) -> None:
    self._bar_start = time.time()

  def progress(self, label: str, done: int, total: int, metrics: Mapping[str, float],
               images: int) -> None:
    if not self._progress or not self._write:
      return
    if not self._tty and done < total:
      return
    width = 24
    filled = int(width * done / max(total, 1))
    elapsed = max(time.time() - self._bar_start, 1e-9)
    stats = ' '.join(f'{k} {v:.4f}' for k, v in metrics.items())
    line = (f'{label} [{"#" * filled}{"." * (width - filled)}] {done}/{total} {stats} '
            f'{images / elapsed:.1f} img/s {elapsed:.0f}s')
    sys.stderr.write(('\r' if self._tty else '') + line + ('\n' if done >= total else ''))
    sys.stderr.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def plot_curves(workdir: str) -> str | None:
  """learning_curves.png: loss and accuracy per step, a dashed line at each phase switch."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, field in zip(axes, ('loss', 'accuracy')):
    for kind, style in (('train', '-'), ('val', 'o-')):
      pts = [(r['step'], r[field]) for r in records if r.get('kind') == kind and field in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=kind, markersize=3)
    ax.set_xlabel('step')
    ax.set_title(field)
  switches = [(r['step'], r['phase']) for r in records if r.get('kind') == 'phase_start']
  for ax in axes:
    for step, name in switches:
      ax.axvline(step, color='gray', linestyle='--', linewidth=1)
      ax.text(step, ax.get_ylim()[1], f' {name}', va='top', fontsize=8, color='gray')
    ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, 'learning_curves.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_confusion(workdir: str, name: str, matrix: np.ndarray, class_names: Sequence[str]) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = len(class_names)
  size = max(4.0, 0.45 * n + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(matrix, cmap='Blues')
  ax.set_xticks(range(n), class_names, rotation=60, ha='right', fontsize=8)
  ax.set_yticks(range(n), class_names, fontsize=8)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if n <= 30:
    peak = matrix.max() if matrix.size else 0
    for i in range(n):
      for j in range(n):
        ax.text(j, i, int(matrix[i, j]), ha='center', va='center', fontsize=7,
                color='white' if matrix[i, j] > peak / 2 else 'black')
  ax.set_title(f'confusion matrix: {name}')
  fig.tight_layout()
  path = os.path.join(workdir, f'confusion_{name}.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _pct(x) -> str:
  return '—' if x is None else f'{100 * x:.2f}%'


_SPLIT_COLUMNS = (('acc', 'accuracy'), ('balanced acc', 'balanced_accuracy'),
                  ('macro-F1', 'macro_f1'), ('ECE', 'ece'), ('top-5', 'top5'))


def _phase_rows(phase: Mapping[str, Any]) -> list[str]:
  """One row per evaluated split; the phase's own cells only on its first row."""
  splits = [s for s in ('val', 'test') if phase.get(s)] or [None]
  rows = []
  for i, split in enumerate(splits):
    m = phase.get(split) or {}
    lead = (f'{phase["name"]} | {phase["trainable"]} | {phase["epochs"]}' if i == 0
            else ' |  | ')
    cells = ' | '.join(_pct(m.get(key)) for _, key in _SPLIT_COLUMNS)
    seconds = f'{phase.get("seconds", 0):.1f}' if i == 0 else ''
    rows.append(f'| {lead} | {split or "—"} | {cells} | {seconds} |')
  return rows


def _class_cells(m: Mapping[str, Any], i: int) -> str:
  """n, precision, recall, F1 of class i; records from before these fields show —."""
  confusion = m.get('confusion')
  n = sum(confusion[i]) if confusion else None
  at = lambda key: (m.get(key) or [None] * (i + 1))[i]
  # per_class (= recall) is None for a class with no examples, where recall is undefined.
  return ' | '.join(['—' if n is None else str(n), _pct(at('precision')),
                     _pct(m['per_class'][i]), _pct(at('f1'))])


def summary_markdown(summary: Mapping[str, Any]) -> str:
  """Per-phase results on each split, per-class precision/recall/F1 and timing as markdown.

  Balanced accuracy, macro-F1 and calibration sit next to accuracy because on
  an imbalanced or few-shot split accuracy alone can rank runs by how well
  they predict the largest class.
  """
  lines = [f'## {summary.get("title", "Run summary")}', '',
           '| phase | trainable | epochs | split | '
           + ' | '.join(name for name, _ in _SPLIT_COLUMNS) + ' | time (s) |',
           '|---|---|---:|---|' + '---:|' * (len(_SPLIT_COLUMNS) + 1)]
  for p in summary['phases']:
    lines += _phase_rows(p)
  lines += ['', 'ECE: expected calibration error over 15 equal-width confidence bins '
            '(lower is better).']
  final = summary.get('final', {})
  splits = [s for s in ('val', 'test') if s in final]
  if splits:
    names = final[splits[0]]['class_names']
    header = ' | '.join(f'{s} {c}' for s in splits for c in ('n', 'precision', 'recall', 'F1'))
    lines += ['', '| class | ' + header + ' |', '|---|' + '---:|' * (4 * len(splits))]
    for i, name in enumerate(names):
      lines.append(f'| {name} | ' + ' | '.join(_class_cells(final[s], i) for s in splits) + ' |')
    lines += ['', 'Recall is per-class accuracy (— for a class with no examples); precision '
              'and F1 read 0 for a class never predicted.']
  lines += _tta_and_calibration_lines(summary)
  notes = summary.get('notes', [])
  if notes:
    lines += [''] + [f'- {n}' for n in notes]
  return '\n'.join(lines) + '\n'


def _tta_and_calibration_lines(summary: Mapping[str, Any]) -> list[str]:
  lines = []
  tta = summary.get('tta')
  if tta:
    parts = [f'{s} {100 * r["accuracy_single_view"]:.2f}% → {100 * r["accuracy"]:.2f}%'
             for s, r in tta.items() if isinstance(r, dict)]
    lines += ['', f'Test-time augmentation ({tta["mode"]}, softmax averaged over the views; the '
              'final results above use it): single view → TTA accuracy: ' + ', '.join(parts) + '.']
  cal = summary.get('calibration')
  if cal:
    parts = [f'{s} ECE {100 * r["ece_before"]:.2f}% → {100 * r["ece_after"]:.2f}%, NLL '
             f'{r["nll_before"]:.4f} → {r["nll_after"]:.4f}'
             for s, r in cal.items() if isinstance(r, dict)]
    why = f' ({cal["kept_1_because"]})' if cal.get('kept_1_because') else ''
    lines += ['', f'Temperature scaling: T = {cal["temperature"]:.3f} fitted on the validation '
              f'logits{why}, stored with the export (`tljax.predict` divides logits by it): '
              + '; '.join(parts) + '.']
  return lines


def write_summary(workdir: str, summary: Mapping[str, Any]) -> str:
  text = summary_markdown(summary)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(workdir, SUMMARY_JSON), 'w') as f:
    f.write(dumps(dict(summary), indent=2))
  return text
