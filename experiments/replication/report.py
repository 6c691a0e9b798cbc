r"""Side-by-side table of the replication: tljax vs the plain PyTorch loop, per phase and seed.

  .venv/bin/python experiments/replication/report.py \
      --torch=experiments/results/replication/torch.jsonl \
      --tljax=experiments/results/replication/tljax.jsonl \
      --base=tljax:baseline --out=experiments/results/replication/lite0_digits.md

Inputs are JSON lines {framework, arm, seed, head_only: {val, test}, fine_tuned: {val, test}}
(`torch_lite0.py` writes them; `--collect_tljax ARM=DIR_PATTERN` turns tljax workdirs'
summary.json into such lines first, e.g. `baseline=/tmp/repl/tljax_s{seed}`). Every
(framework, arm) becomes a row per phase and split: per-seed accuracies and the mean ± 95%
Student-t interval (tljax.stats.mean_ci); each row is also paired per seed with the `--base`
arm (tljax.stats.paired: mean difference ± 95% interval, wins/ties/losses).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os

from tljax import stats

PHASES = ('head_only', 'fine_tuned')
SPLITS = ('val', 'test')


def collect_tljax(arm: str, pattern: str, seeds) -> list[dict]:
  rows = []
  for seed in seeds:
    path = os.path.join(pattern.format(seed=seed), 'summary.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      summary = json.load(f)
    row = {'framework': 'tljax', 'arm': arm, 'seed': seed, 'workdir': os.path.dirname(path)}
    for p in summary['phases']:
      row[p['name']] = {s: p[s]['accuracy'] for s in SPLITS if s in p}
    assert row['fine_tuned'] == {s: summary['final'][s]['accuracy'] for s in SPLITS}
    rows.append(row)
  return rows


def load(paths) -> list[dict]:
  rows = []
  for pattern in paths:
    for path in sorted(glob.glob(pattern)):
      with open(path) as f:
        rows += [json.loads(line) for line in f if line.strip()]
  return rows


def table(rows: list[dict], base: str, arm_notes: dict[str, str]) -> str:
  runs = collections.OrderedDict()   # (framework, arm) → {seed: row}; a later line replaces
  for r in rows:
    runs.setdefault((r['framework'], r['arm']), {})[r['seed']] = r
  base_key = tuple(base.split(':', 1))
  seeds = sorted({s for by_seed in runs.values() for s in by_seed})
  head = ('| framework | arm | phase | split | ' + ' | '.join(f'seed {s}' for s in seeds)
          + f' | mean ± 95% CI | paired diff vs {base} (± 95% CI) | W/T/L |')
  lines = [head, '|' + '---|' * 4 + '---:|' * (len(seeds) + 2) + '---|']
  for (fw, arm), by_seed in runs.items():
    for phase in PHASES:
      for split in SPLITS:
        values = {s: r[phase][split] for s, r in by_seed.items() if phase in r and split in r[phase]}
        if not values:
          continue
        cells = [f'{values[s] * 100:.1f}' if s in values else '' for s in seeds]
        ci = stats.mean_ci(values.values())
        if (fw, arm) == base_key or base_key not in runs:
          diff, wtl = '—', '—'
        else:
          ref = {s: r[phase][split] for s, r in runs[base_key].items()
                 if phase in r and split in r[phase]}
          common = set(values) & set(ref)
          if common:
            p = stats.paired(values, ref, tie=0.5 / 450)
            d = p.difference
            diff = (f'{d.mean * 100:+.1f}' + (f' ± {d.half_width * 100:.1f}' if d.n > 1 else '')
                    + f' (n={d.n})')
            wtl = f'{p.wins}/{p.ties}/{p.losses}'
          else:
            diff, wtl = 'no common seed', '—'
        lines.append(f'| {fw} | {arm} | {phase} | {split} | ' + ' | '.join(cells)
                     + f' | {ci.format()} | {diff} | {wtl} |')
  notes = [f'- `{fw}:{arm}`: {arm_notes[f"{fw}:{arm}"]}' for fw, arm in runs
           if f'{fw}:{arm}' in arm_notes]
  return '\n'.join(lines + ([''] + notes if notes else []))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--torch', nargs='*', default=[])
  p.add_argument('--tljax', nargs='*', default=[], help='JSON-lines files of tljax rows')
  p.add_argument('--collect_tljax', nargs='*', default=[],
                 help='ARM=PATTERN with {seed}: read tljax workdirs, append to --tljax_out')
  p.add_argument('--tljax_out', default='')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--base', default='tljax:baseline', help='framework:arm every row is paired with')
  p.add_argument('--notes', default='', help='JSON {"framework:arm": "what differs"}')
  p.add_argument('--out', default='')
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  collected = []
  for item in args.collect_tljax:
    arm, pattern = item.split('=', 1)
    collected += collect_tljax(arm, pattern, seeds)
  if collected and args.tljax_out:
    with open(args.tljax_out, 'a') as f:
      for r in collected:
        f.write(json.dumps(r) + '\n')
  rows = load(args.tljax) + ([] if args.tljax_out in args.tljax else collected) + load(args.torch)
  notes = json.load(open(args.notes)) if args.notes else {}
  text = table(rows, args.base, notes)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
