r"""How much does transfer learning buy as labelled data shrinks? A few-shot sweep.

  python -m experiments.ablation --config=configs/default.py --workdir=workdirs/ablation \
      --shots=5,10,20
  python -m experiments.ablation --config=configs/default.py:tiny --workdir=/tmp/abl --shots=4,8

For each number of training examples per class, the config's job (with its
variants: scratch, head-only, fine-tuned) runs under `<workdir>/shots_<n>`;
the table (val / test accuracy per run and shot count) is then generated from
those workdirs' summary.json files and written to `<workdir>/ablation.md`.
Re-running resumes or skips finished runs (each workdir's checkpoints).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('ablation_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def rows_of(workdir: str) -> dict[str, tuple[float, float | None]]:
  """run label → (val accuracy, test accuracy) from a job's summary.json file(s)."""
  out = {}
  subdirs = [d for d in sorted(os.listdir(workdir))
             if os.path.isfile(os.path.join(workdir, d, 'summary.json'))]
  for name in subdirs or ['']:
    with open(os.path.join(workdir, name, 'summary.json')) as f:
      phases = json.load(f)['phases']
    for p in phases:
      label = name if len(phases) == 1 and name else f'{name}: {p["name"]}'.strip(': ')
      out[label] = (p['val']['accuracy'], (p.get('test') or {}).get('accuracy'))
  return out


def table(results: dict[int, dict[str, tuple]]) -> str:
  shots = sorted(results)
  labels = list(dict.fromkeys(l for s in shots for l in results[s]))
  pct = lambda x: '—' if x is None else f'{100 * x:.1f}'
  lines = ['| run | ' + ' | '.join(f'{s}/class val | {s}/class test' for s in shots) + ' |',
           '|---|' + '---:|---:|' * len(shots)]
  for label in labels:
    cells = []
    for s in shots:
      val, test = results[s].get(label, (None, None))
      cells += [pct(val), pct(test)]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='config file[:arg]')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--shots', default='5,10,20', help='examples per class, comma-separated')
  args = parser.parse_args()
  from tljax import train
  results = {}
  for shots in (int(s) for s in args.shots.split(',')):
    config = load_config(args.config)
    with config.unlocked():
      config.data.examples_per_class = shots
    workdir = os.path.join(args.workdir, f'shots_{shots}')
    print(f'=== {shots} examples per class ===', flush=True)
    train.train_and_evaluate(config, workdir)
    results[shots] = rows_of(workdir)
  text = table(results)
  with open(os.path.join(args.workdir, 'ablation.md'), 'w') as f:
    f.write(text)
  print('\n' + text)


if __name__ == '__main__':
  main()
