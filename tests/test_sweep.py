"""tljax.sweep: the sweep file, overrides, sharding, skip / resume / failure, and the tables.

The table tests write run directories by hand (known accuracies), so the
intervals and paired differences are checked against numbers worked out
here; the end-to-end tests train tiny runs in child processes as a user's
sweep does.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tljax import sweep as sweep_lib
from tljax import sweep_results
from tljax.sweep import Run, SweepError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_SRC = '''
from tljax.config import base_config, phase


def get_config():
  c = base_config()
  c.model.name = 'simple_cnn_tiny'
  c.model.head.dropout = 0.25
  c.preprocessing = 'torchvision'
  c.input_size = 24
  c.load_size = 28
  c.data.update(dict(source='synthetic', num_classes=3, num_train=32, num_val=16, num_test=8))
  c.batch_size = 8
  c.phases = (phase('head', epochs=1, lr=1e-2, cache_features=False),
              phase('finetune', epochs=EPOCHS, trainable='all', lr=1e-3))
  c.checkpoint.every_steps = 1
  c.log.update(dict(every_steps=2, tensorboard=False, plots=False, progress=False))
  c.lock()
  return c
'''

SWEEP_SRC = '''
def get_sweep(arg=''):
  return {
      'arms': {
          'base': {},
          'lr3': {'phases[1].lr': 3e-3},
          'typo': {'phases[1].nope': 1},
          'negative_lr': {'phases[1].lr': -1.0},
      },
      'seeds': (0,),
  }
'''


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _sweep(tmp_path, text=SWEEP_SRC, name='sweep.py'):
  return sweep_lib.load_sweep(_write(tmp_path, name, text))


def test_importing_the_sweep_leaves_absl_flags_to_tljax_main():
  """Both modules in one process (the test suite, a notebook): only main's flags exist."""
  from tljax import main   # noqa: F401  (raised DuplicateFlagError when sweep defined flags)
  from absl import flags
  assert 'sweep' not in flags.FLAGS and 'config' in flags.FLAGS


# ---- the sweep file and the plan ----

@pytest.mark.parametrize('body, message', [
    ("{'grid': {}}", 'with an "arms" entry'),
    ("{'arms': {}}", 'non-empty dict'),
    ("{'arms': {'a b': {}}}", 'file-name-safe'),
    ("{'arms': {'a': {}}, 'seed': (1,)}", "unknown keys ['seed']"),
    ("{'arms': {'a': {'seed': 3}}}", 'set "seeds" instead'),
    ("{'arms': {'a': {}}, 'grid': {'lr': ()}}", 'non-empty tuples'),
    ("{'arms': {'a': {}}, 'seeds': (1, 1)}", 'distinct ints'),
    ("{'arms': {'a': {}}, 'baseline': 'b'}", "baseline 'b' is not an arm"),
    ("{'arms': {'a': {}}, 'few_shot_seed': -2}", 'few_shot_seed'),
])
def test_bad_sweep_files_are_one_message_each(tmp_path, body, message):
  with pytest.raises(SweepError, match=message.replace('[', r'\[').replace(']', r'\]')):
    _sweep(tmp_path, f'def get_sweep(arg=""):\n  return {body}\n')


def test_plan_crosses_arms_grid_and_seeds_seeds_outermost(tmp_path):
  sweep = _sweep(tmp_path, "def get_sweep(arg=''):\n  return {'arms': {'a': {}, 'b': {}}, "
                 "'grid': {'data.examples_per_class': (2, 5), 'phases[0].bn': ('frozen',)}, "
                 "'seeds': (4, 7)}\n")
  runs = sweep_lib.plan(sweep)
  assert len(runs) == 2 * 2 * 2
  assert [r.seed for r in runs] == [4] * 4 + [7] * 4
  assert runs[0].name == 'a--data.examples_per_class=2--phases0.bn=frozen--seed4'
  assert runs[1].arm == 'b' and runs[2].grid[0] == ('data.examples_per_class', 5)
  assert len({r.name for r in runs}) == len(runs)
  assert sweep.baseline == 'a'
  assert [r.seed for r in sweep_lib.plan(sweep_lib.load_sweep(
      str(tmp_path / 'sweep.py'), seeds=3))][::4] == [0, 1, 2]


@pytest.mark.parametrize('count', [1, 2, 3, 5, 13])
def test_shards_take_every_run_exactly_once(count):
  runs = [Run('a', (('x', i),), s) for s in range(3) for i in range(4)]
  taken = [r for i in range(count) for r in sweep_lib.shard(runs, i, count)]
  assert sorted(r.name for r in taken) == sorted(r.name for r in runs)
  assert len(taken) == len(runs)


@pytest.mark.parametrize('text', ['1/1', '2', '-1/2', 'a/b', '3/2'])
def test_bad_shard_flags(text):
  with pytest.raises(SweepError, match='expected i/n'):
    sweep_lib.parse_shard(text)


def test_worker_slots_gpus_and_cpu_shares():
  assert sweep_lib.worker_slots(0, ['0', '1'], [0, 1]) == [
      {'gpu': '0', 'shared': False}, {'gpu': '1', 'shared': False}]
  assert [s['gpu'] for s in sweep_lib.worker_slots(3, ['5', '6'], [0])] == ['5', '6', '5']
  assert sweep_lib.worker_slots(0, [], [0, 1, 2, 3]) == [{'cpus': None}]
  assert sweep_lib.worker_slots(2, [], [0, 1, 2, 3, 4]) == [{'cpus': [0, 1]}, {'cpus': [2, 3]}]
  with pytest.raises(SweepError, match='exceeds the 2 CPU cores'):
    sweep_lib.worker_slots(3, [], [0, 1])
  assert sweep_lib.local_gpus({'JAX_PLATFORMS': 'cpu'}) == []
  assert sweep_lib.local_gpus({'CUDA_VISIBLE_DEVICES': '2,3'}) == ['2', '3']
  assert sweep_lib.local_gpus({'CUDA_VISIBLE_DEVICES': '-1'}) == []


def test_build_config_applies_overrides_seed_and_reports_bad_ones(tmp_path):
  config = _write(tmp_path, 'cfg.py', CONFIG_SRC.replace('EPOCHS', '2'))
  sweep = _sweep(tmp_path)
  cfg = sweep_lib.build_config(config, sweep, Run('lr3', (), 5))
  assert cfg.phases[1].lr == 3e-3 and cfg.seed == 5 and cfg.data.few_shot_seed == -1
  with pytest.raises(ValueError, match=r"override phases\[1\].nope=1: no such config field"):
    sweep_lib.build_config(config, sweep, Run('typo', (), 0))
  with pytest.raises(ValueError, match=r'phases\[1\].lr=-1.0 is invalid; expected > 0'):
    sweep_lib.build_config(config, sweep, Run('negative_lr', (), 0))
  with pytest.raises(ValueError, match='indexes past the end'):
    sweep_lib.build_config(config, sweep, Run('base', (('phases[4].lr', 1.0),), 0))
  with pytest.raises(ValueError, match='cannot be casted'):
    sweep_lib.build_config(config, sweep, Run('base', (('batch_size', 'big'),), 0))
  fixed = sweep_lib.Sweep(arms={'a': {}}, grid={}, seeds=(0, 1), baseline='a', few_shot_seed=9)
  assert sweep_lib.build_config(config, fixed, Run('a', (), 1)).data.few_shot_seed == 9


def test_tiny_stays_tiny_when_an_arm_replaces_the_phases_or_weights(tmp_path):
  sweep = sweep_lib.load_sweep(os.path.join(ROOT, 'configs/sweeps/demo.py'))
  cfg = sweep_lib.build_config(os.path.join(ROOT, 'configs/default.py') + ':tiny', sweep,
                               Run('scratch', (), 0))
  assert [p.name for p in cfg.phases] == ['scratch'] and cfg.phases[0].epochs == 1
  assert cfg.pretrained.source == 'none' and cfg.model.name.endswith('_tiny')
  full = sweep_lib.build_config(os.path.join(ROOT, 'configs/default.py'), sweep,
                                Run('scratch', (), 2))
  assert full.phases[0].epochs == 20 and full.pretrained.source == 'none' and full.seed == 2


# ---- tables and intervals from hand-written run directories ----

def _fake_run(root, run, status='done', val=None, test=None, phases=None, error=None, cores=2):
  directory = os.path.join(root, 'runs', run.name)
  os.makedirs(directory, exist_ok=True)
  if status == 'done':
    phases = phases or [('train', val, test)]
    summary = {'phases': [{'name': n, 'val': {'accuracy': v}, 'test': {'accuracy': t}}
                          for n, v, t in phases]}
    summary['final'] = {k: summary['phases'][-1][k] for k in ('val', 'test')}
    with open(os.path.join(directory, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  sweep_results.write_status(directory, status=status, seconds=10.0, error=error, cores=cores)


def test_table_intervals_and_paired_differences_match_hand_computation(tmp_path):
  sweep = sweep_lib.Sweep(arms={'base': {}, 'new': {}}, grid={}, seeds=(0, 1, 2),
                          baseline='base')
  runs = sweep_lib.plan(sweep)
  base_test = {0: 0.80, 1: 0.84, 2: 0.82}
  new_test = {0: 0.86, 1: 0.85, 2: 0.90}
  for run in runs:
    test = (base_test if run.arm == 'base' else new_test)[run.seed]
    _fake_run(str(tmp_path), run, val=test - 0.01, test=test)
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  # base: mean 0.82, s = 0.02, t(0.975, 2) = 4.302653 -> half width 4.302653*0.02/sqrt(3)=0.0497
  assert '| base | 3 | 81.0 ± 5.0 | 82.0 ± 5.0 |' in text
  # new: mean 0.87, s = 0.026458 -> 0.0657
  assert '| new | 3 | 86.0 ± 6.6 | 87.0 ± 6.6 |' in text
  # differences 0.06, 0.01, 0.08: mean 0.05, s = 0.036056 -> 0.0896
  assert '| new | 3 | 5.0 ± 9.0 | 5.0 ± 9.0 | 3/0/0 | no | no |' in text
  records = [json.loads(l) for l in open(tmp_path / 'results.jsonl')]
  assert [r['status'] for r in records] == ['done'] * 6
  assert records[1]['arm'] == 'new' and records[1]['test_accuracy'] == pytest.approx(0.86)
  assert records[0]['workdir'].endswith('runs/base--seed0') and records[0]['seconds'] == 10.0
  assert set(records[0]) >= {'arm', 'grid', 'seed', 'status', 'error', 'val_accuracy',
                             'test_accuracy', 'seconds', 'workdir'}
  assert (tmp_path / 'table.md').read_text() == text
  assert (tmp_path / 'test_accuracy.png').stat().st_size > 1000


def test_separated_intervals_are_named_and_failures_listed(tmp_path):
  sweep = sweep_lib.Sweep(arms={'base': {}, 'far': {}, 'bad': {}}, grid={}, seeds=(0, 1, 2),
                          baseline='base')
  runs = sweep_lib.plan(sweep)
  for run in runs:
    if run.arm == 'bad':
      _fake_run(str(tmp_path), run, status='failed', error='ValueError: nope')
    elif run.arm == 'far' and run.seed == 2:
      continue   # never started: missing
    else:
      acc = {'base': 0.50, 'far': 0.90}[run.arm] + 0.01 * run.seed
      _fake_run(str(tmp_path), run, val=acc, test=acc)
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  assert '9 runs: 5 done, 3 failed, 1 missing' in text
  assert '| far | 2 |' in text and '| yes, higher | yes, higher |' in text
  assert '- `bad--seed1`: failed — ValueError: nope' in text
  assert '- `far--seed2`: missing — not started' in text
  statuses = [json.loads(l)['status'] for l in open(tmp_path / 'results.jsonl')]
  assert statuses.count('missing') == 1 and statuses.count('failed') == 3


def test_per_phase_rows_and_a_numeric_grid_axis_plot(tmp_path):
  sweep = sweep_lib.Sweep(arms={'scratch': {}, 'transfer': {}},
                          grid={'data.examples_per_class': (2, 0)}, seeds=(0, 1),
                          baseline='scratch', per_phase=True,
                          labels={'data.examples_per_class': {0: 'all'}})
  runs = sweep_lib.plan(sweep)
  for run in runs:
    shots = dict(run.grid)['data.examples_per_class']
    if run.arm == 'scratch':
      _fake_run(str(tmp_path), run, val=0.3, test=0.3 + 0.1 * run.seed)
    else:
      _fake_run(str(tmp_path), run, phases=[('head', 0.6, 0.6 + shots / 100),
                                            ('ft', 0.7, 0.7 + run.seed / 100)])
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  assert '| transfer: head | all | 2 | 60.0 ± 0.0 | 60.0 ± 0.0 |' in text
  assert '| transfer: head | 2 | 2 | 60.0 ± 0.0 | 62.0 ± 0.0 |' in text
  # ft - scratch per seed: 0.70 - 0.30, 0.71 - 0.40 -> mean 0.355, s = 0.06364, t(1)=12.706
  assert '| transfer: ft | all | 2 | 40.0 ± 0.0 | 35.5 ± 57.2 | 2/0/0 | no | no |' in text
  # head - scratch at 2 shots, test: 0.62 - 0.30, 0.62 - 0.40 -> mean 0.27, s = 0.0707 -> 63.5
  assert '| transfer: head | 2 | 2 | 30.0 ± 0.0 | 27.0 ± 63.5 | 2/0/0 | no | no |' in text
  assert (tmp_path / 'test_accuracy_vs_examples_per_class.png').stat().st_size > 1000


# ---- end to end: child processes, skip, failure, resume ----

def _sweep_cmd(config, sweep, workdir, *extra):
  return [sys.executable, '-m', 'tljax.sweep', f'--config={config}', f'--sweep={sweep}',
          f'--workdir={workdir}', *extra]


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _export(directory):
  from tljax.porting import weights_io
  variables, _ = weights_io.load_weights(os.path.join(directory, 'export'))
  return variables


def test_sweep_end_to_end_failed_arms_then_skip_on_rerun(tmp_path):
  config = _write(tmp_path, 'cfg.py', CONFIG_SRC.replace('EPOCHS', '1'))
  sweep = _write(tmp_path, 'sweep.py', SWEEP_SRC)
  workdir = str(tmp_path / 'sw')
  workers = min(2, len(os.sched_getaffinity(0)))
  out = subprocess.run(_sweep_cmd(config, sweep, workdir, f'--workers={workers}'), cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  records = {r['arm']: r for r in map(json.loads, open(os.path.join(workdir, 'results.jsonl')))}
  assert records['base']['status'] == records['lr3']['status'] == 'done'
  assert 0.0 <= records['lr3']['test_accuracy'] <= 1.0
  assert records['typo']['status'] == 'failed' and 'phases[1].nope' in records['typo']['error']
  assert records['negative_lr']['status'] == 'failed'
  assert "phases[1].lr=-1.0 is invalid" in records['negative_lr']['error']
  for arm in ('typo', 'negative_lr'):   # refused before any training
    assert not os.path.exists(os.path.join(workdir, 'runs', f'{arm}--seed0', 'checkpoints'))
  if workers == 2:   # each run pinned to its own half of the cores
    shares = {line.split('[cpus ')[1] for line in out.stdout.splitlines() if '[cpus ' in line}
    assert len(shares) == 2, out.stdout
  summary = os.path.join(workdir, 'runs', 'base--seed0', 'summary.json')
  mtime = os.stat(summary).st_mtime_ns
  again = subprocess.run(_sweep_cmd(config, sweep, workdir), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout + again.stderr
  assert 'trained 0 runs' in again.stdout and 'start ' not in again.stdout
  assert again.stdout.count('skip ') == 4 and os.stat(summary).st_mtime_ns == mtime
  assert '| base | 1 |' in again.stdout


def test_a_sweep_killed_mid_run_stops_the_run_and_resumes_it_bit_identically(tmp_path):
  config = _write(tmp_path, 'cfg.py', CONFIG_SRC.replace('EPOCHS', '6'))
  sweep = _write(tmp_path, 'sweep.py', "def get_sweep(arg=''):\n  return {'arms': {'a': {}}, "
                 "'seeds': (3,)}\n")
  reference = str(tmp_path / 'reference')
  out = subprocess.run(_sweep_cmd(config, sweep, reference), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  workdir = str(tmp_path / 'killed')
  run_dir = os.path.join(workdir, 'runs', 'a--seed3')
  proc = subprocess.Popen(_sweep_cmd(config, sweep, workdir), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [s for s in os.listdir(os.path.join(run_dir, 'checkpoints'))
             if s.isdigit()] if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else []
    if any(int(s) >= 8 for s in steps):
      break
    time.sleep(0.1)
  else:
    pytest.fail('the run never reached step 8')
  child = sweep_results.read_status(run_dir)['pid']
  os.kill(proc.pid, signal.SIGKILL)   # the sweep dies; its run must not go on as an orphan
  proc.wait()
  deadline = time.time() + 120
  while time.time() < deadline and _alive(child):
    time.sleep(0.1)
  assert not _alive(child), 'the run outlived its sweep'
  assert sweep_results.read_status(run_dir)['status'] == 'running'
  out = subprocess.run(_sweep_cmd(config, sweep, workdir), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'resuming from step' in open(os.path.join(run_dir, 'log.txt')).read()
  status = sweep_results.read_status(run_dir)
  assert status['status'] == 'done' and status['attempts'] == 2
  a, b = _export(run_dir), _export(os.path.join(reference, 'runs', 'a--seed3'))
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  metrics = [open(os.path.join(d, 'metrics.jsonl')).read()
             for d in (run_dir, os.path.join(reference, 'runs', 'a--seed3'))]
  assert metrics[0] == metrics[1]


# ---- the committed sweep files and their documented commands ----

SWEEPS = sorted(os.path.join(ROOT, 'configs', 'sweeps', f)
                for f in os.listdir(os.path.join(ROOT, 'configs', 'sweeps')) if f.endswith('.py'))


def documented_commands(path):
  """Every `python -m tljax.sweep ...` command in a sweep file's docstring, as argument lists."""
  import ast
  import shlex
  doc = ast.get_docstring(ast.parse(open(path).read())) or ''
  text = doc.replace('\\\n', ' ')
  commands = []
  for line in text.splitlines():
    line = line.split('#')[0].strip()
    if line.startswith('python -m tljax.sweep'):
      commands.append(shlex.split(line)[3:])
  return commands


@pytest.mark.parametrize('path', SWEEPS, ids=os.path.basename)
def test_every_sweep_file_documents_a_run_and_a_test_mode_whose_runs_all_validate(path):
  commands = documented_commands(path)
  flags_of = [dict(a[2:].split('=', 1) for a in c) for c in commands]
  assert any(':tiny' in f['config'] for f in flags_of), 'no documented test mode'
  assert any(':tiny' not in f['config'] for f in flags_of), 'no documented full run'
  for f in flags_of:
    assert f['sweep'].split(':')[0] == os.path.relpath(path, ROOT)
    sweep = sweep_lib.load_sweep(os.path.join(ROOT, f['sweep']),
                                 int(f['seeds']) if 'seeds' in f else None)
    for run in sweep_lib.plan(sweep):
      cfg = sweep_lib.build_config(os.path.join(ROOT, f['config']), sweep, run)
      if ':tiny' in f['config']:
        assert cfg.model.name.endswith('_tiny') and all(p.epochs <= 1 for p in cfg.phases)


def test_a_run_another_process_holds_is_left_alone_not_failed(tmp_path):
  from tljax import workdir_lock
  config = _write(tmp_path, 'cfg.py', CONFIG_SRC.replace('EPOCHS', '1'))
  sweep = _write(tmp_path, 'sweep.py', "def get_sweep(arg=''):\n  return {'arms': {'a': {}}, "
                 "'seeds': (0,)}\n")
  workdir = str(tmp_path / 'sw')
  run_dir = os.path.join(workdir, 'runs', 'a--seed0')
  os.makedirs(run_dir)
  with workdir_lock.acquire(run_dir):
    out = subprocess.run(_sweep_cmd(config, sweep, workdir), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'busy   a--seed0' in out.stdout and '1 in use by another process' in out.stdout
  assert sweep_results.read_status(run_dir)['status'] == 'missing'
  assert 'is in use by pid' in open(os.path.join(run_dir, 'log.txt')).read()


def test_a_consistent_paired_gain_is_named_although_the_arms_intervals_overlap(tmp_path):
  sweep = sweep_lib.Sweep(arms={'base': {}, 'new': {}}, grid={}, seeds=(0, 1, 2),
                          baseline='base')
  runs = sweep_lib.plan(sweep)
  base = {0: 0.80, 1: 0.84, 2: 0.82}
  gain = {0: 0.02, 1: 0.03, 2: 0.025}
  for run in runs:
    acc = base[run.seed] + (gain[run.seed] if run.arm == 'new' else 0.0)
    _fake_run(str(tmp_path), run, val=acc, test=acc)
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  # differences 0.02, 0.03, 0.025: mean 0.025, s = 0.005 -> 4.302653 * 0.005 / sqrt(3) = 0.0124
  assert '| new | 3 | 2.5 ± 1.2 | 2.5 ± 1.2 | 3/0/0 | yes, higher | no |' in text


def test_runs_on_different_core_counts_are_flagged(tmp_path):
  sweep = sweep_lib.Sweep(arms={'a': {}}, grid={}, seeds=(0, 1), baseline='a')
  runs = sweep_lib.plan(sweep)
  _fake_run(str(tmp_path), runs[0], val=0.5, test=0.5, cores=1)
  _fake_run(str(tmp_path), runs[1], val=0.5, test=0.5, cores=2)
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  assert 'runs had 1 or 2 CPU cores each' in text
  _fake_run(str(tmp_path), runs[0], val=0.5, test=0.5, cores=2)
  text = sweep_results.collect(str(tmp_path), sweep, runs, sweep_lib.run_dir, title='t')
  assert '; 2 CPU cores per run' in text and 'cores each' not in text


@pytest.mark.slow
def test_make_demos_sweep_command_runs_in_test_mode(tmp_path):
  """The Makefile's own sweep line (shell and all), with the config's :tiny and one seed."""
  venv = os.path.dirname(os.path.dirname(sys.executable))
  dry = subprocess.run(['make', '-n', 'demo', f'VENV={venv}', f'WORKDIR={tmp_path}/demo'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  lines = dry.stdout.replace('\\\n', ' ').splitlines()
  command = next(l for l in lines if '-m tljax.sweep' in l)
  assert '--config=configs/default.py ' in command and '--sweep=configs/sweeps/demo.py' in command
  command = command.replace('--config=configs/default.py ', '--config=configs/default.py:tiny ')
  out = subprocess.run(['bash', '-c', command + ' --seeds=1'], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert 'trained 2 runs' in out.stdout and '| transfer: fine_tuned | 1 |' in out.stdout
