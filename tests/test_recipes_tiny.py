"""Every recipe's test mode, run the way the README tells a user to run it.

  python -m tljax.main --config=configs/<recipe>.py:tiny --workdir=<dir>

The tiny runs go through everything a real run does (the process restarted
under the tuned allocator with the huge-block cache preloaded, the C++
kernels, every phase and variant, checkpoints, evaluation, summaries) on
maps small enough to reach 1x1: the README's own test mode once crashed with
heap corruption from a kernel that no in-process test had run on such a map.
So each runs as a subprocess with default settings, in the environment the
user's shell had: without what tests/conftest.py adds for in-process tests
(8 fake CPU devices, the CPU platform pinned) and without tljax's switches
(TLJAX_OPS, TLJAX_NATIVE, TLJAX_SANITIZE, ...), so the CPU backend and its kernels
are on; each run's one `CPU backend:` line must say so.

Recipes that take an argument (`ARGS`, e.g. `monkeys.py:model=...`) run once
per value whose tiny config differs. Two runs at a time: on 2 cores that
overlaps one run's single-threaded tracing and compiling with the other's.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import pytest

from tljax.cpu_backend import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
WORKERS = 2
TIMEOUT_S = 900
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'

# What tests/conftest.py sets for in-process tests (only dropped where it has these values).
_CONFTEST = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2', 'KERAS_BACKEND': 'jax'}
_FAKE_DEVICES = '--xla_force_host_platform_device_count=8'


def user_environment() -> dict[str, str]:
  """This process's environment as the user's shell had it before the test harness."""
  env = {k: v for k, v in os.environ.items()
         if not (k.startswith('TLJAX_') and k != 'TLJAX_CACHE_DIR') and _CONFTEST.get(k) != v
         and not k.startswith('PYTEST_')}
  flags = ' '.join(f for f in env.pop('XLA_FLAGS', '').split() if f != _FAKE_DEVICES)
  if flags:
    env['XLA_FLAGS'] = flags
  return env


def _module(path):
  spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_runs() -> list[tuple[str, str, object]]:
  """(recipe file, `:arg` spec, config) for each recipe and each argument value whose tiny
  config differs from those before it; longest runs (most phases) first."""
  runs, seen = [], set()
  for path in CONFIGS:
    module = _module(path)
    values = [f'{k}={v}' for k, vs in getattr(module, 'ARGS', {}).items() for v in vs]
    for arg in [''] + values:
      spec = ','.join(filter(None, (arg, 'tiny')))
      cfg = module.get_config(spec)
      key = (path, cfg.to_json_best_effort())
      if key not in seen:
        seen.add(key)
        runs.append((path, spec, cfg))
  return sorted(runs, key=lambda r: -len(r[2].phases))


def _summaries(cfg, workdir):
  """{summary.json path: the phase names it must list} for a finished run."""
  return {os.path.join(workdir, 'summary.json'): [p.name for p in cfg.phases]}


def _launch(path, spec, workdir, log):
  cmd = [sys.executable, '-m', 'tljax.main', f'--config=configs/{os.path.basename(path)}:{spec}',
         f'--workdir={workdir}']
  return subprocess.Popen(cmd, cwd=ROOT, env=user_environment(), stdout=log,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_every_recipe_tiny_runs_like_a_user_runs_it(tmp_path):
  runs = tiny_runs()
  assert {r[0] for r in runs} == set(CONFIGS)
  pending, running, done = list(runs), [], []
  while pending or running:
    while pending and len(running) < WORKERS:
      path, spec, cfg = pending.pop(0)
      name = f'{os.path.basename(path)[:-3]}_{spec.replace(",", "_").replace("=", "-")}'
      log = open(tmp_path / f'{name}.log', 'w')
      running.append((path, spec, cfg, tmp_path / name, log, time.time(),
                      _launch(path, spec, tmp_path / name, log)))
    time.sleep(0.2)
    for item in list(running):
      proc, started = item[-1], item[-2]
      if proc.poll() is None and time.time() - started > TIMEOUT_S:
        proc.kill()
        proc.wait()
      if proc.poll() is not None:
        item[4].close()
        running.remove(item)
        done.append((*item[:4], proc.returncode, time.time() - started))

  failures = []
  for path, spec, cfg, workdir, rc, seconds in done:
    what = f'configs/{os.path.basename(path)}:{spec} (rc {rc}, {seconds:.0f} s)'
    print(what)
    output = (workdir.parent / f'{workdir.name}.log').read_text()
    problems = []
    if rc != 0:
      problems.append('exit status')
    backend = [line for line in output.splitlines() if line.startswith('CPU backend:')]
    if len(backend) != 1:
      problems.append(f'{len(backend)} "CPU backend:" lines, not 1')
    elif native._compiler() is not None and 'C++ kernels' not in backend[0]:
      problems.append(f'ran without the C++ kernels ({backend[0]})')
    elif GLIBC and native._compiler() is not None and not ('huge-block cache' in backend[0]
                                                          or 'tcmalloc' in backend[0]):
      problems.append(f'not restarted under the tuned allocator ({backend[0]})')
    if native._compiler() is not None and 'pure-JAX CPU kernels' in output:
      problems.append('ran without the C++ kernels')
    for summary, phases in _summaries(cfg, workdir).items():
      if not os.path.exists(summary):
        problems.append(f'no {os.path.relpath(summary, workdir)}')
        continue
      with open(summary) as f:
        listed = [p['name'] for p in json.load(f)['phases']]
      if listed != phases:
        problems.append(f'{os.path.relpath(summary, workdir)} lists phases {listed}, not {phases}')
    if problems:
      failures.append(f'{what}: {", ".join(problems)}\n{output[-3000:]}')
  assert not failures, '\n\n'.join(failures)
