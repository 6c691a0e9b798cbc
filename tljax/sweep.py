r"""Sweeps: one config over arms × grid points × seeds, each run in its own workdir.

  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/demo.py \
      --workdir=workdirs/default
  python -m tljax.sweep --config=C --sweep=S --workdir=W --seeds=5 --workers=2
  python -m tljax.sweep --config=C --sweep=S --workdir=W --shard=3/8   # machine 3 of 8
  python -m tljax.sweep --config=C --sweep=S --workdir=W --collect     # tables only

A sweep file's `get_sweep(arg='')` returns a dict:

  arms      {name: {override path: value, ...}, ...}   paths as `--config.` takes them,
            e.g. 'phases[1].bn', 'data.examples_per_class'; a value may be any
            Python value the field holds (a tuple of `phase(...)` for 'phases')
  grid      {override path: (v1, v2, ...)}   optional; crossed with every arm
  seeds     tuple of ints, default (0, 1, 2); `--seeds=N` means range(N)
  baseline  the arm paired differences are taken against (default: the first)
  few_shot_seed  optional int: one few-shot draw for every seed (default: the
            draw follows the run seed, like init, data order and augmentation)
  per_phase True: a multi-phase run reports every phase's end-of-phase
            metrics as its own row ('transfer: head_only'), not only the last
  labels    optional {override path: {value: tick label}} for plots and tables

Every run is the config + its arm's overrides + its grid point + `seed`, in
`W/runs/<arm>[--<path>=<value>...]--seed<k>`. A bad override or a config that
fails validation marks that run `failed` (with the message) before anything
trains; the others still run. Running the same command again skips finished
runs, resumes interrupted ones from their checkpoints (bit-identical, the
training loop's resume) and leaves failed ones alone unless --retry_failed.

Each run is a child process (`--run=NAME`), so one crash loses one run; a
killed sweep sends its runs SIGTERM (they save and stop), and a run another
process holds is reported `busy`. `--workers=K` runs K at once: on GPUs each
takes its own device (CUDA_VISIBLE_DEVICES), on CPU each its own share of the
cores (affinity; XLA's summation order follows the core count, so compare
runs trained with the same share); the default is one per local GPU, else 1.
TPU chips are not split: run one at a time there (each run uses every chip). `--shard=i/n` takes every n-th run
starting at i, so n machines on one shared filesystem (a SLURM array, a
Kubernetes indexed job) split a sweep; any of them, or a later `--collect`,
aggregates whatever has finished into W/results.jsonl, W/table.md and plots
(`tljax.sweep_results`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Sequence

from absl import app, flags, logging

from tljax.sweep_results import read_status, write_status

FLAGS = flags.FLAGS
BUSY = 75   # a run's exit code when another process holds its workdir

SWEEP_KEYS = {'arms', 'grid', 'seeds', 'baseline', 'few_shot_seed', 'per_phase', 'labels'}


class SweepError(ValueError):
  """The sweep file or the flags are unusable as a whole (no run can start)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  arms: dict[str, dict[str, Any]]
  grid: dict[str, tuple]
  seeds: tuple[int, ...]
  baseline: str
  few_shot_seed: int | None = None
  per_phase: bool = False
  labels: dict[str, dict] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  grid: tuple[tuple[str, Any], ...]
  seed: int

  @property
  def name(self) -> str:
    """Readable and stable: the same sweep names its runs the same on every machine."""
    parts = [self.arm] + [f'{_path_slug(p)}={_value_slug(v)}' for p, v in self.grid]
    return '--'.join(parts + [f'seed{self.seed}'])


def _path_slug(path: str) -> str:
  return re.sub(r'\[(\d+)\]', r'\1', path)


def _value_slug(value) -> str:
  return re.sub(r'[^A-Za-z0-9_.+-]', '_', str(value))[:40]


def _load_module(spec: str, what: str):
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'{what} file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'tljax_{what}_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def load_sweep(spec: str, seeds: int | None = None) -> Sweep:
  """The sweep file's dict, checked as a whole; one message per problem."""
  module, arg = _load_module(spec, 'sweep')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{spec}: a sweep file defines get_sweep(arg=\'\') returning a dict')
  d = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(d, dict) or 'arms' not in d:
    raise SweepError(f'{spec}: get_sweep() must return a dict with an "arms" entry')
  unknown = set(d) - SWEEP_KEYS
  if unknown:
    raise SweepError(f'{spec}: unknown keys {sorted(unknown)}; a sweep has {sorted(SWEEP_KEYS)}')
  arms = d['arms']
  if not isinstance(arms, dict) or not arms:
    raise SweepError(f'{spec}: "arms" must be a non-empty dict {{name: {{path: value}}}}')
  for name, overrides in arms.items():
    if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9_.+-]+', name):
      raise SweepError(f'{spec}: arm name {name!r} must be a file-name-safe string')
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
      raise SweepError(f'{spec}: arm {name!r} must map override paths (str) to values')
  grid = d.get('grid', {})
  if not isinstance(grid, dict) or not all(
      isinstance(k, str) and isinstance(v, (tuple, list)) and v for k, v in grid.items()):
    raise SweepError(f'{spec}: "grid" must map override paths to non-empty tuples of values')
  for path in [p for o in arms.values() for p in o] + list(grid):
    if path == 'seed':
      raise SweepError(f'{spec}: "seed" is the sweep\'s own axis; set "seeds" instead')
  seed_list = tuple(range(seeds)) if seeds is not None else tuple(d.get('seeds', (0, 1, 2)))
  if not seed_list or not all(isinstance(s, int) and s >= 0 for s in seed_list) or (
      len(set(seed_list)) != len(seed_list)):
    raise SweepError(f'seeds {seed_list!r}: need distinct ints >= 0 (--seeds=N >= 1)')
  baseline = d.get('baseline', next(iter(arms)))
  if baseline not in arms:
    raise SweepError(f'{spec}: baseline {baseline!r} is not an arm ({", ".join(arms)})')
  few_shot_seed = d.get('few_shot_seed')
  if few_shot_seed is not None and not (isinstance(few_shot_seed, int) and few_shot_seed >= 0):
    raise SweepError(f'{spec}: few_shot_seed must be an int >= 0 or absent')
  return Sweep(arms=dict(arms), grid={k: tuple(v) for k, v in grid.items()}, seeds=seed_list,
               baseline=baseline, few_shot_seed=few_shot_seed,
               per_phase=bool(d.get('per_phase', False)), labels=dict(d.get('labels', {})))


def plan(sweep: Sweep) -> list[Run]:
  """Every run, seeds outermost: an unfinished sweep has whole seeds of every arm to pair."""
  points = [tuple(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
  runs = [Run(arm, point, seed) for seed in sweep.seeds for point in points for arm in sweep.arms]
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise SweepError('two runs get the same directory name (grid values that differ only in '
                     'characters outside [A-Za-z0-9_.+-]); rename them')
  return runs


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r'(\d+)/(\d+)', text.strip())
  if not m or not int(m.group(1)) < int(m.group(2)):
    raise SweepError(f'--shard={text!r}: expected i/n with 0 <= i < n, e.g. --shard=0/4')
  return int(m.group(1)), int(m.group(2))


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
  return list(runs[index::count])


def build_config(config_spec: str, sweep: Sweep, run: Run):
  """The run's config, validated; ValueError names the override or field at fault."""
  from ml_collections.config_flags import config_path
  from tljax import config as config_lib
  module, arg = _load_module(config_spec, 'config')
  cfg = module.get_config(arg) if arg else module.get_config()
  for path, value in [*sweep.arms[run.arm].items(), *run.grid]:
    try:
      config_path.set_value(path, cfg, copy.deepcopy(value))
    except IndexError as e:
      raise ValueError(f'override {path}={value!r} indexes past the end of a tuple ({e})') from e
    except (KeyError, AttributeError) as e:
      raise ValueError(f'override {path}={value!r}: no such config field ({e}); use a path '
                       'that --config.<path> accepts for this config file') from e
    except TypeError as e:
      raise ValueError(f'override {path}={value!r}: {e}') from e
  cfg.seed = run.seed
  if sweep.few_shot_seed is not None:
    cfg.data.few_shot_seed = sweep.few_shot_seed
  if 'tiny' in arg.split(','):
    config_lib.shrink_training(cfg)
  config_lib.validate(cfg)
  return cfg


def run_dir(workdir: str, run: Run) -> str:
  return os.path.join(workdir, 'runs', run.name)


# ---- one run, in a child process ----

def train_one(config_spec: str, sweep: Sweep, run: Run, workdir: str) -> int:
  """Trains one run in this process and records how it ended; the exit code to use."""
  from tljax import preemption, train, workdir_lock
  directory = run_dir(workdir, run)
  try:
    with workdir_lock.acquire(directory):
      pass
  except workdir_lock.WorkdirInUse as e:   # another sweep process trains it: not a failure
    print(str(e), file=sys.stderr, flush=True)
    return BUSY
  before = read_status(directory)
  spent = float(before.get('seconds') or 0.0)
  write_status(directory, status='running', attempts=int(before.get('attempts', 0)) + 1,
               pid=os.getpid(), host=os.uname().nodename, code=code_version(),
               cores=len(os.sched_getaffinity(0)))
  start = time.time()
  try:
    train.train_and_evaluate(build_config(config_spec, sweep, run), directory)
  except preemption.Preempted as e:
    write_status(directory, status='running', seconds=spent + time.time() - start,
                 error=f'interrupted: {e}')
    print(str(e), file=sys.stderr, flush=True)
    return 143
  except Exception as e:  # one run's failure must not stop the sweep; the log keeps the trace
    traceback.print_exc()
    write_status(directory, status='failed', seconds=spent + time.time() - start,
                 error=_one_line(e))
    return 1
  write_status(directory, status='done', seconds=spent + time.time() - start)
  return 0


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f'{type(e).__name__}: {lines[-1] if lines else ""}'.rstrip(': ')


# ---- the scheduler ----

def local_gpus(environ=None) -> list[str]:
  """GPU ids this host may use, without initialising JAX (which would claim them)."""
  env = os.environ if environ is None else environ
  platforms = (env.get('JAX_PLATFORMS') or '').strip().lower()
  if platforms and platforms.split(',')[0] not in ('cuda', 'gpu', 'rocm'):
    return []
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [d.strip() for d in visible.split(',') if d.strip() and d.strip() != '-1']
  if not shutil.which('nvidia-smi'):
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith('GPU '))]


def worker_slots(workers: int, gpus: Sequence[str], cpus: Sequence[int]) -> list[dict]:
  """What each concurrent run gets: a GPU id, or on CPU hosts a disjoint set of cores."""
  if workers < 0:
    raise SweepError(f'--workers={workers}: expected >= 0 (0 = one per local GPU, else 1)')
  count = workers or max(1, len(gpus))
  if gpus:
    return [{'gpu': gpus[i % len(gpus)], 'shared': count > len(gpus)} for i in range(count)]
  if count > len(cpus):
    raise SweepError(f'--workers={count} exceeds the {len(cpus)} CPU cores this process may use')
  if count == 1:
    return [{'cpus': None}]
  size = len(cpus) // count
  return [{'cpus': list(cpus[i * size:(i + 1) * size])} for i in range(count)]


def _child_env(slot: dict, base: dict) -> dict:
  env = dict(base)
  if 'gpu' in slot:
    env['CUDA_VISIBLE_DEVICES'] = slot['gpu']
    if slot['shared']:   # several runs on one GPU: allocate on demand, not 75% each
      env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  return env


def _child_command(run: Run) -> list[str]:
  args = [f'--config={FLAGS.config}', f'--sweep={FLAGS.sweep}', f'--workdir={FLAGS.workdir}',
          f'--run={run.name}']
  if FLAGS.seeds is not None:
    args.append(f'--seeds={FLAGS.seeds}')
  return [sys.executable, '-m', 'tljax.sweep', *args]


def _child_setup(cpus) -> None:
  """In the child before exec: its CPU share, and SIGTERM (save, exit) if the sweep dies,
  so a killed sweep leaves no orphan training on and a re-run can resume every run."""
  if cpus:
    os.sched_setaffinity(0, cpus)
  if sys.platform.startswith('linux'):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class _Stop(Exception):
  pass


def execute(runs: list[Run], sweep: Sweep, slots: list[dict], base_env: dict) -> dict[str, int]:
  """Runs `runs` on `slots`; counts of how they ended. SIGTERM/SIGINT stop the children
  (they save a checkpoint) and then the sweep."""
  counts = {'done': 0, 'failed': 0, 'interrupted': 0, 'busy': 0}
  pending, running = list(runs), {}   # slot index -> (run, process, log file, start)
  total = len(runs)

  def stop(signum, frame):
    raise _Stop(signum)

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      for i, slot in enumerate(slots):
        if i in running or not pending:
          continue
        run = pending.pop(0)
        directory = run_dir(FLAGS.workdir, run)
        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, 'log.txt'), 'a')
        cpus = slot.get('cpus')
        proc = subprocess.Popen(
            _child_command(run), env=_child_env(slot, base_env), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda c=cpus: _child_setup(c))
        running[i] = (run, proc, log, time.time())
        where = f' [gpu {slot["gpu"]}]' if 'gpu' in slot else (f' [cpus {cpus}]' if cpus else '')
        print(f'start  {run.name}{where}', flush=True)
      time.sleep(0.2)
      for i, (run, proc, log, start) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[i]
        outcome = _record_exit(run, proc.returncode)
        counts[outcome] += 1
        print(f'{outcome:<6} {run.name} ({time.time() - start:.0f} s) '
              f'[{sum(counts.values())}/{total}]{_brief(run)}', flush=True)
  except _Stop:
    print('stopping: SIGTERM to the running runs (each saves a checkpoint); re-run the same '
          'command to resume', file=sys.stderr, flush=True)
    for run, proc, log, _ in running.values():
      proc.send_signal(signal.SIGTERM)
    for run, proc, log, _ in running.values():
      proc.wait()
      log.close()
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return counts


def _record_exit(run: Run, returncode: int) -> str:
  directory = run_dir(FLAGS.workdir, run)
  status = read_status(directory)
  if status.get('status') == 'done':
    return 'done'
  if returncode == 143:
    return 'interrupted'
  if returncode == BUSY:
    return 'busy'
  if status.get('status') != 'failed':   # killed or crashed before it could say so
    write_status(directory, status='failed',
                 error=f'the run process exited with code {returncode}; see {directory}/log.txt')
  return 'failed'


def _brief(run: Run) -> str:
  status = read_status(run_dir(FLAGS.workdir, run))
  if status.get('status') == 'failed':
    return f': {status.get("error")}'
  try:
    with open(os.path.join(run_dir(FLAGS.workdir, run), 'summary.json')) as f:
      final = json.load(f).get('final', {})
  except (OSError, ValueError):
    return ''
  parts = [f'{s} {100 * final[s]["accuracy"]:.1f}%' for s in ('val', 'test') if s in final]
  return f': {", ".join(parts)}' if parts else ''


def prepare(runs: list[Run], sweep: Sweep) -> list[Run]:
  """Which runs to start: finished ones are skipped, failed ones too unless retried, and a
  run whose overrides or config are invalid is marked failed here, before anything trains."""
  todo = []
  for run in runs:
    directory = run_dir(FLAGS.workdir, run)
    status = read_status(directory)
    if status['status'] == 'done':
      print(f'skip   {run.name} (done)', flush=True)
      continue
    if status['status'] == 'failed' and not FLAGS.retry_failed:
      print(f'skip   {run.name} (failed: {status.get("error")}; --retry_failed runs it again)',
            flush=True)
      continue
    try:
      build_config(FLAGS.config, sweep, run)
    except ValueError as e:
      write_status(directory, status='failed', error=_one_line(e))
      print(f'failed {run.name}: {_one_line(e)}', flush=True)
      continue
    todo.append(run)
  return todo


def _base_env() -> dict:
  env = dict(os.environ)
  if FLAGS.tune_malloc:
    from tljax.cpu_backend import allocator
    env = allocator.restart_environ(env) or env
  return env


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage(f'unexpected arguments {argv[1:]}')
  if not (FLAGS.config and FLAGS.sweep and FLAGS.workdir):
    _usage('need --config=configs/<recipe>.py[:arg], --sweep=configs/sweeps/<name>.py and '
           '--workdir=DIR')
  try:
    sweep = load_sweep(FLAGS.sweep, FLAGS.seeds)
    runs = plan(sweep)
    index, count = parse_shard(FLAGS.shard)
    _load_module(FLAGS.config, 'config')
  except SweepError as e:
    _usage(str(e))
  if FLAGS.run is not None:
    match = [r for r in runs if r.name == FLAGS.run]
    if not match:
      _usage(f'--run={FLAGS.run!r} is not a run of this sweep')
    from tljax import preemption
    preemption.stop_on_sigterm()
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    sys.exit(train_one(FLAGS.config, sweep, match[0], FLAGS.workdir))
  from tljax import sweep_results
  if not FLAGS.collect:
    try:
      slots = worker_slots(FLAGS.workers, local_gpus(), sorted(os.sched_getaffinity(0)))
    except SweepError as e:
      _usage(str(e))
    mine = shard(runs, index, count)
    print(f'sweep: {len(runs)} runs ({len(sweep.arms)} arms × '
          f'{len(runs) // len(sweep.arms) // len(sweep.seeds)} grid points × '
          f'{len(sweep.seeds)} seeds); this shard {index}/{count}: {len(mine)}; '
          f'{len(slots)} at a time', flush=True)
    start = time.time()
    try:
      counts = execute(prepare(mine, sweep), sweep, slots, _base_env())
    except _Stop:
      sys.exit(143)
    elapsed = time.time() - start
    trained = counts['done'] + counts['failed'] + counts['interrupted']
    rate = f'; {3600 * counts["done"] / elapsed:.1f} runs/hour' if counts['done'] else ''
    busy = f'; {counts["busy"]} in use by another process' if counts['busy'] else ''
    print(f'trained {trained} runs in {elapsed:.0f} s ({counts["done"]} done, '
          f'{counts["failed"]} failed, {counts["interrupted"]} interrupted{busy}){rate}',
          flush=True)
  text = sweep_results.collect(FLAGS.workdir, sweep, runs, run_dir,
                               title=f'{FLAGS.sweep} on {FLAGS.config}', source=_provenance())
  print('\n' + text, flush=True)


def _provenance() -> str:
  """The command, for the table's header (each run records its own code version)."""
  command = ' '.join(['python -m tljax.sweep', f'--config={FLAGS.config}',
                      f'--sweep={FLAGS.sweep}', f'--workdir={FLAGS.workdir}']
                     + ([f'--seeds={FLAGS.seeds}'] if FLAGS.seeds is not None else []))
  return f'`{command}`; collected {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'


def code_version() -> str:
  """'git <hash>[ (modified)]' of the tljax source this process runs, or 'unknown'."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, text=True,
                            capture_output=True, timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           text=True, capture_output=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return f'git {commit}{" (modified)" if dirty else ""}' if commit else 'unknown'


def _usage(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _define_flags() -> None:
  """Only when run as a command: tljax.main defines some of the same names, and a library
  import (tests, notebooks) must not claim absl's global flags."""
  flags.DEFINE_string('config', None, 'Config file[:arg], as tljax.main takes it.')
  flags.DEFINE_string('sweep', None, 'Sweep file[:arg] with get_sweep().')
  flags.DEFINE_string('workdir', None, 'Sweep directory: runs/, results.jsonl, table.md, plots.')
  flags.DEFINE_integer('seeds', None, 'Run seeds range(N) instead of the sweep file\'s seeds.')
  flags.DEFINE_integer('workers', 0, 'Runs at once (0: one per local GPU, else 1).')
  flags.DEFINE_string('shard', '0/1', 'i/n: run every n-th run starting at i (0-based).')
  flags.DEFINE_bool('collect', False, 'Only aggregate the finished runs; train nothing.')
  flags.DEFINE_bool('retry_failed', False, 'Run failed runs again (they resume from checkpoints).')
  flags.DEFINE_bool('tune_malloc', True, 'CPU: start runs under the tuned host allocator '
                    '(tljax.cpu_backend.allocator), as tljax.main does.')
  flags.DEFINE_string('run', None, 'Internal: train the one run of this name, in this process.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
