r"""Within-run effects of the small-data toolkit, read from a finished sweep's run summaries.

  python experiments/toolkit_report.py --sweep_dir=workdirs/toolkit_imbalance \
      --output=experiments/results/issue18/imbalance/within_runs.md

The sweep table compares arms across runs. Some effects are measured inside
every run on the same weights, and pairing them there is sharper: test ECE
before vs after temperature scaling, the single view vs the TTA views, and
(for a long-tailed split) the recall of the rarest classes against the
baseline arm's. Every figure is a mean ± 95% Student-t interval over seeds,
computed from `summary.json` files, nothing typed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tljax import stats  # noqa: E402
from tljax.sweep_results import read_status  # noqa: E402


def _runs(sweep_dir: str) -> dict[str, dict[int, dict]]:
  """arm → seed → summary of every finished run."""
  out = collections.defaultdict(dict)
  records = [json.loads(line) for line in open(os.path.join(sweep_dir, 'results.jsonl'))]
  for r in records:
    if r['status'] != 'done' or read_status(r['workdir']).get('status') != 'done':
      continue
    with open(os.path.join(r['workdir'], 'summary.json')) as f:
      out[r['arm']][r['seed']] = json.load(f)
  return out


def _cell(values) -> str:
  return stats.mean_ci(values).format()


def report(sweep_dir: str, rare: int) -> str:
  runs = _runs(sweep_dir)
  arms = list(runs)
  lines = [f'# Within-run effects: {sweep_dir}', '',
           'Mean ± 95% CI over seeds (Student t), percent; Δ = per-seed paired difference.', '']
  lines += ['## Temperature scaling (fitted on val, judged on test)', '',
            '| arm | T | test ECE before | test ECE after | Δ ECE (after − before) | '
            'test NLL before | test NLL after |', '|---|---:|---:|---:|---:|---:|---:|']
  for arm in arms:
    cal = [s['calibration'] for s in runs[arm].values() if 'calibration' in s]
    if not cal:
      continue
    t = stats.mean_ci(c['temperature'] for c in cal).format(scale=1.0, digits=2)
    before = [c['test']['ece_before'] for c in cal]
    after = [c['test']['ece_after'] for c in cal]
    nll_b = stats.mean_ci(c['test']['nll_before'] for c in cal).format(scale=1.0, digits=3)
    nll_a = stats.mean_ci(c['test']['nll_after'] for c in cal).format(scale=1.0, digits=3)
    lines.append(f'| {arm} | {t} | {_cell(before)} | {_cell(after)} | '
                 f'{_cell(a - b for a, b in zip(after, before))} | {nll_b} | {nll_a} |')
  tta = {arm: [s['tta'] for s in runs[arm].values() if 'tta' in s] for arm in arms}
  if any(tta.values()):
    lines += ['', '## Test-time augmentation (same weights, single view vs the views)', '',
              '| arm | mode | test single view | test TTA | Δ test (TTA − single) | Δ val |',
              '|---|---|---:|---:|---:|---:|']
    for arm, rows in tta.items():
      if not rows:
        continue
      single = [r['test']['accuracy_single_view'] for r in rows]
      views = [r['test']['accuracy'] for r in rows]
      dval = [r['val']['accuracy'] - r['val']['accuracy_single_view'] for r in rows]
      lines.append(f'| {arm} | {rows[0]["mode"]} | {_cell(single)} | {_cell(views)} | '
                   f'{_cell(v - s for v, s in zip(views, single))} | {_cell(dval)} |')
  if rare:
    base = arms[0]
    lines += ['', f'## Recall of the {rare} rarest classes (the last by class index), test', '',
              f'| arm | rare-class recall | common-class recall | Δ rare vs {base} |',
              '|---|---:|---:|---:|']

    def recall(summary, which):
      r = summary['final']['test']['recall']
      part = r[-rare:] if which == 'rare' else r[:-rare]
      return sum(part) / len(part)

    for arm in arms:
      seeds = sorted(runs[arm])
      rare_r = {s: recall(runs[arm][s], 'rare') for s in seeds}
      common = [recall(runs[arm][s], 'common') for s in seeds]
      base_r = {s: recall(runs[base][s], 'rare') for s in runs[base]}
      delta = stats.paired(rare_r, base_r).difference.format() if arm != base else '—'
      lines.append(f'| {arm} | {_cell(rare_r.values())} | {_cell(common)} | {delta} |')
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sweep_dir', required=True)
  parser.add_argument('--output', default='')
  parser.add_argument('--rare', type=int, default=0,
                      help='also report the recall of the N last classes (long-tailed splits)')
  args = parser.parse_args()
  text = report(args.sweep_dir, args.rare)
  print(text)
  if args.output:
    os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
    with open(args.output, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
