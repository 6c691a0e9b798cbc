"""A sweep's results, generated from its run directories and never typed.

`collect` reads each run's `sweep_run.json` and `summary.json` and writes,
in the sweep directory:

  results.jsonl  one line per run: arm, grid, seed, status (done / failed /
                 missing), error, val_accuracy, test_accuracy, seconds, workdir,
                 and the other metrics of every split and phase
  table.md       per row (arm, or arm: phase) and grid point: the finished
                 seeds n and mean ± 95% CI (Student t, n - 1 dof) of every
                 metric; paired differences against the baseline over the seeds
                 both finished, with wins/ties/losses; failed runs with errors
  *.png          accuracy with 95% CI: against a numeric grid axis as lines
                 with bands, otherwise as bars with whiskers

Rows are only ever ranked by `tljax.stats.separated` intervals; the table
says which pairs those are instead of sorting by the mean.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from tljax import report, stats

STATUS_FILE = 'sweep_run.json'
METRICS = (('accuracy', 'acc'), ('balanced_accuracy', 'bal. acc'), ('macro_f1', 'macro-F1'),
           ('ece', 'ECE'), ('ece_after_temperature', 'ECE after T'))


def read_status(run_dir: str) -> dict:
  try:
    with open(os.path.join(run_dir, STATUS_FILE)) as f:
      status = json.load(f)
  except (OSError, ValueError):
    return {'status': 'missing'}
  if status.get('status') == 'done' and not os.path.isfile(os.path.join(run_dir, 'summary.json')):
    return {**status, 'status': 'missing', 'error': 'summary.json is gone; run it again'}
  return status


def write_status(run_dir: str, **fields) -> dict:
  """Atomic (rename), so a reader never sees half a file."""
  os.makedirs(run_dir, exist_ok=True)
  status = {k: v for k, v in read_status(run_dir).items() if k != 'error'}
  status.update(fields)
  tmp = os.path.join(run_dir, STATUS_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(status, f, indent=1)
  os.replace(tmp, os.path.join(run_dir, STATUS_FILE))
  return status



def run_record(run, directory: str, sweep) -> dict[str, Any]:
  """One results.jsonl line."""
  status = read_status(directory)
  record = {'name': run.name, 'arm': run.arm, 'grid': {p: v for p, v in run.grid},
            'seed': run.seed, 'status': status['status'], 'error': status.get('error'),
            'val_accuracy': None, 'test_accuracy': None, 'seconds': status.get('seconds'),
            'workdir': directory, 'code': status.get('code'), 'cores': status.get('cores'),
            'phases': []}
  if record['status'] == 'running':
    record.update(status='missing', error=status.get('error') or 'interrupted or still running; '
                  're-running the sweep command resumes it')
  elif record['status'] == 'missing' and not record['error']:
    record['error'] = 'not started'
  if record['status'] != 'done':
    return record
  with open(os.path.join(directory, report.SUMMARY_JSON)) as f:
    summary = json.load(f)
  for p in summary.get('phases', []):
    record['phases'].append({'name': p['name'], **{
        split: _scalars(p[split]) for split in ('val', 'test') if p.get(split)}})
  final = summary.get('final', {})
  calibrated = summary.get('calibration', {})
  for split in ('val', 'test'):
    if final.get(split):
      record[split] = _scalars(final[split])
      record[f'{split}_accuracy'] = final[split].get('accuracy')
      if split in calibrated:
        record[split]['ece_after_temperature'] = calibrated[split]['ece_after']
  if calibrated:
    record['temperature'] = calibrated['temperature']
  return record


def _scalars(m: dict) -> dict:
  return {k: m[k] for k, _ in METRICS + (('loss', ''),) if m.get(k) is not None}


def rows_of(record: dict, per_phase: bool) -> list[tuple[str, dict]]:
  """(row label, {split: metrics}) a finished run contributes to the table."""
  if per_phase and len(record['phases']) > 1:
    return [(f'{record["arm"]}: {p["name"]}', {s: p[s] for s in ('val', 'test') if s in p})
            for p in record['phases']]
  return [(record['arm'], {s: record[s] for s in ('val', 'test') if s in record})]


def _grid_key(grid: dict) -> tuple:
  """A hashable grid point: {path: value} with values as JSON text."""
  return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in grid.items()))


def _accuracies(data: dict, key: tuple, label: str, split: str) -> dict:
  """{seed: accuracy} of one table cell; empty where nothing finished."""
  return data.get((key, label), {}).get(split, {}).get('accuracy', {})


def table_data(records: Sequence[dict], sweep) -> dict:
  """{(grid key, row label): {split: {metric: {seed: value}}}} over finished runs."""
  data: dict = {}
  for record in records:
    if record['status'] != 'done':
      continue
    for label, splits in rows_of(record, sweep.per_phase):
      cell = data.setdefault((_grid_key(record['grid']), label), {})
      for split, metrics in splits.items():
        for metric, value in metrics.items():
          cell.setdefault(split, {}).setdefault(metric, {})[record['seed']] = value
  return data


def _fmt_grid(key: tuple, sweep) -> list[str]:
  values = dict(key)
  return [_label(sweep, path, json.loads(values[path])) for path in sweep.grid]


def _label(sweep, path: str, value) -> str:
  labels = sweep.labels.get(path, {})
  return str(labels.get(value, value))


def _splits(data: dict) -> list[str]:
  return [s for s in ('val', 'test') if any(s in cell for cell in data.values())]


def markdown(records: Sequence[dict], sweep, title: str, source: str = '') -> str:
  data = table_data(records, sweep)
  splits = _splits(data)
  counts = {s: sum(r['status'] == s for r in records) for s in ('done', 'failed', 'missing')}
  code = sorted({r['code'] for r in records if r['status'] == 'done' and r.get('code')})
  if code:
    source = f'{source}; runs trained at {", ".join(code)}'.lstrip('; ')
  cores = sorted({r.get('cores') for r in records if r['status'] == 'done' and r.get('cores')})
  if len(cores) > 1:   # XLA:CPU's reduction order follows its thread count
    source += (f'; runs had {" or ".join(map(str, cores))} CPU cores each, which changes '
               'floating-point summation order and so the results: compare like with like')
  elif cores:
    source += f'; {cores[0]} CPU core{"s" if cores[0] > 1 else ""} per run'
  lines = [f'# Sweep: {title}', '', *([source, ''] if source else []),
           f'{len(records)} runs: {counts["done"]} done, {counts["failed"]} failed, '
           f'{counts["missing"]} missing. Seeds {", ".join(map(str, sweep.seeds))}'
           + (f'; one few-shot draw for all seeds (few_shot_seed={sweep.few_shot_seed})'
              if sweep.few_shot_seed is not None else '; the few-shot draw follows the seed')
           + '.', '',
           'Mean ± 95% CI over seeds (Student t, n − 1 dof), in percent (ECE too); n = finished '
           'seeds (one seed: the value alone, no interval).', '']
  grid_cols = [_short(p) for p in sweep.grid]
  primary = 'test' if 'test' in splits else 'val'
  wanted = [(s, 'accuracy') for s in splits] + [(primary, m) for m, _ in METRICS[1:]]
  metric_cols = [(s, m, f'{s} {dict(METRICS)[m]}') for s, m in wanted
                 if any(m in cell.get(s, {}) for cell in data.values())]
  lines.append('| ' + ' | '.join(['row'] + grid_cols + ['n'] + [c for _, _, c in metric_cols])
               + ' |')
  lines.append('|' + '---|' * (1 + len(grid_cols)) + '---:|' * (1 + len(metric_cols)))
  for (key, label), cell in data.items():
    n = max((len(v) for s in cell.values() for v in s.values()), default=0)
    values = [_cell(cell.get(s, {}).get(m, {})) for s, m, _ in metric_cols]
    lines.append('| ' + ' | '.join([label] + _fmt_grid(key, sweep) + [str(n)] + values) + ' |')
  lines += ['', *_paired_section(data, sweep, splits, grid_cols)]
  failed = [r for r in records if r['status'] != 'done']
  if failed:
    lines += ['', '## Runs without results', '']
    lines += [f'- `{r["name"]}`: {r["status"]} — {r["error"]}' for r in failed]
  return '\n'.join(lines) + '\n'


def _cell(seeds: dict, scale: float = 100.0) -> str:
  """'87.3 ± 1.2' in percent; the mean alone where one seed gives no interval."""
  if not seeds:
    return '—'
  ci = stats.mean_ci(seeds.values())
  if ci.n < 2:
    return f'{scale * ci.mean:.1f}'
  return f'{scale * ci.mean:.1f} ± {scale * ci.half_width:.1f}'


def _short(path: str) -> str:
  return path.rsplit('.', 1)[-1]


def baseline_label(data: dict, sweep) -> str:
  labels = [label for _, label in data]
  exact = [l for l in labels if l == sweep.baseline]
  return exact[0] if exact else next((l for l in labels if l.startswith(sweep.baseline + ': ')),
                                     sweep.baseline)


def _paired_section(data: dict, sweep, splits: list[str], grid_cols: list[str]) -> list[str]:
  base = baseline_label(data, sweep)
  primary = 'test' if 'test' in splits else 'val'
  lines = [f'## Paired differences against `{base}` (same seeds; accuracy points)', '',
           f'Per seed both finished: row − {base}. W/T/L counts seeds where the row was ahead / '
           f'equal / behind on {primary}. "Δ ≠ 0" says whether the paired {primary} interval '
           f'excludes zero (the seeds share data order and draw, so this is the sharper test); '
           f'"separated" whether the two rows\' own {primary} intervals do not overlap. Only '
           f'those rows differ in a way these seeds support.', '',
           '| ' + ' | '.join(['row'] + grid_cols + ['seeds'] + [f'Δ {s} acc' for s in splits]
                            + [f'W/T/L ({primary})', 'Δ ≠ 0', 'separated']) + ' |',
           '|' + '---|' * (1 + len(grid_cols)) + '---:|' * (2 + len(splits)) + '---|---|']
  rows = 0
  for (key, label), cell in data.items():
    other = data.get((key, base))
    if label == base or other is None:
      continue
    cols, wtl, nonzero = [], '—', '—'
    common = ()
    for split in splits:
      a = cell.get(split, {}).get('accuracy', {})
      b = other.get(split, {}).get('accuracy', {})
      if not set(a) & set(b):
        cols.append('—')
        continue
      p = stats.paired(a, b)
      common = p.seeds
      cols.append(_cell(dict(zip(p.seeds, (a[s] - b[s] for s in p.seeds)))))
      if split == primary:
        wtl = f'{p.wins}/{p.ties}/{p.losses}'
        d = p.difference
        nonzero = 'n/a' if d.n < 2 else (
            ('yes, higher' if d.mean > 0 else 'yes, lower') if d.low > 0 or d.high < 0 else 'no')
    mine = stats.mean_ci(cell.get(primary, {}).get('accuracy', {}).values())
    theirs = stats.mean_ci(other.get(primary, {}).get('accuracy', {}).values())
    sep = ('yes, higher' if mine.mean > theirs.mean else 'yes, lower') if stats.separated(
        mine, theirs) else 'no'
    lines.append('| ' + ' | '.join([label] + _fmt_grid(key, sweep) + [str(len(common))] + cols
                                   + [wtl, nonzero, sep]) + ' |')
    rows += 1
  if not rows:
    lines.append('| (no other row shares seeds with the baseline yet) |')
  return lines


def plot(records: Sequence[dict], sweep, workdir: str) -> list[str]:
  """PNG files: lines with CI bands against a single numeric grid axis, else CI bars."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  data = table_data(records, sweep)
  if not data:
    return []
  paths = []
  labels = list(dict.fromkeys(label for _, label in data))
  axis = list(sweep.grid)[0] if len(sweep.grid) == 1 else None
  numeric = axis is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     for v in sweep.grid[axis])
  for split in _splits(data):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if numeric:
      values = list(sweep.grid[axis])
      for label in labels:
        points = [(i, _accuracies(data, _grid_key({axis: v}), label, split))
                  for i, v in enumerate(values)]
        points = [(i, seeds) for i, seeds in points if seeds]
        cis = [stats.mean_ci(seeds.values()) for _, seeds in points]
        xs = [i for i, _ in points]
        mean = [100 * ci.mean for ci in cis]
        half = [0.0 if ci.n < 2 else 100 * ci.half_width for ci in cis]
        line, = ax.plot(xs, mean, marker='o', label=label)
        ax.fill_between(xs, [m - h for m, h in zip(mean, half)],
                        [m + h for m, h in zip(mean, half)], color=line.get_color(), alpha=0.2)
        for i, seeds in points:
          ax.plot([i] * len(seeds), [100 * a for a in seeds.values()], '.',
                  color=line.get_color(), markersize=4)
      ax.set_xticks(range(len(values)), [_label(sweep, axis, v) for v in values])
      ax.set_xlabel(axis)
      name = f'{split}_accuracy_vs_{_short(axis)}.png'
    else:
      keys = list(dict.fromkeys(key for key, _ in data))
      width = 0.8 / max(1, len(keys))
      for j, key in enumerate(keys):
        mean, err = [], []
        for label in labels:
          seeds = _accuracies(data, key, label, split)
          ci = stats.mean_ci(seeds.values()) if seeds else None
          mean.append(100 * ci.mean if ci else 0.0)
          err.append(100 * ci.half_width if ci and ci.n >= 2 else 0.0)
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, mean, width, yerr=err, capsize=4, alpha=0.8,
               label=', '.join(_fmt_grid(key, sweep)) or None)
        for x, label in zip(xs, labels):   # every seed, so n = 3 is visibly n = 3
          seeds = _accuracies(data, key, label, split)
          ax.plot([x] * len(seeds), [100 * v for v in seeds.values()], 'k.', markersize=5)
      ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(labels))], labels,
                    rotation=15, ha='right')
      name = f'{split}_accuracy.png'
    ax.set_ylabel(f'{split} accuracy (%), mean ± 95% CI')
    ax.set_title(f'{split} accuracy over seeds {", ".join(map(str, sweep.seeds))}')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def collect(workdir: str, sweep, runs: Sequence, run_dir: Callable, title: str,
            source: str = '') -> str:
  """Writes results.jsonl, table.md and the plots; returns table.md's text."""
  records = [run_record(run, run_dir(workdir, run), sweep) for run in runs]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.jsonl'), 'w') as f:
    f.writelines(report.dumps(r) + '\n' for r in records)
  text = markdown(records, sweep, title, source)
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(text)
  plot(records, sweep, workdir)
  return text
