"""A notebook user's training step under each host allocator, and torch's beside it.

  python -m experiments.allocators --out=allocators.json
  python -m experiments.allocators --models=mobilenet_v2 --configs=glibc,mallopt,tunables+shim

The question: how fast is a plain-Python full fine-tuning step — what someone
writes in a notebook: `tljax.models.create(name, 1000)`, `jax.value_and_grad`
of a cross-entropy loss with BatchNorm in train mode, an optax SGD update, the
whole step under one `jax.jit` (no pmap, no donation, no `tljax.main`) — with
each host allocator, and how does torch's step (torchvision model in
channels_last, `torch.optim.SGD`, the same batch) fare in the same conditions?

Allocator configs (`--configs`):
  glibc          the environment as started (GLIBC_TUNABLES and LD_PRELOAD inherited
                 from this shell are dropped for every config, so this is glibc's default)
  mallopt        the worker calls glibc's `mallopt` first (`_mallopt`: one arena, 1 GiB mmap
                 threshold, no trimming), what a notebook could do in-process
                 first thing: the in-process one-liner a notebook can use
  tunables       GLIBC_TUNABLES = `allocator.TUNABLES`, no preload
  tunables+shim  `allocator.allocator_environ()`: the tunables and the repo's huge-block
                 cache in LD_PRELOAD, what `tljax.main` restarts itself under
  jemalloc, tcmalloc, mimalloc
                 LD_PRELOAD of the system library (skipped, with the reason, when absent)

Every (round, model, config, framework) runs in a fresh interpreter started
with the config's environment, pinned to `--threads` CPUs (XLA sizes its pool
from the affinity mask; torch gets `torch.set_num_threads`). Within a round
each model's configs run in turn with both frameworks back to back, and odd
rounds run that list backwards, so a slow stretch of a shared machine lands on
every config and both frameworks. Timing follows `experiments.timing.measure`
(median of `--iters` timed steps after `--warmup` untimed ones; rounds pool
their samples as `experiments.benchmark` does). Each worker also reports its
peak RSS (`getrusage`) and its minor page faults per timed step: a step that
maps and zeroes fresh memory shows up there before it shows up in the time.

The torch peer of efficientnet_lite0 is `efficientnet_lite_pytorch`'s Lite0
(the same architecture), as in `experiments.bench_torch`; torchvision has no Lite0.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

MARK = '@@ALLOCATORS-RESULT@@'
CONFIGS = ('glibc', 'mallopt', 'tunables', 'tunables+shim', 'jemalloc', 'tcmalloc', 'mimalloc')
LIBRARIES = {
    'jemalloc': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
    'tcmalloc': '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
    'mimalloc': '/usr/lib/x86_64-linux-gnu/libmimalloc.so.2',
}
FRAMEWORKS = ('tljax', 'torch')
DEFAULT_MODELS = ('efficientnet_lite0', 'resnet34', 'mobilenet_v2')
INHERITED_ALLOCATOR_VARS = ('GLIBC_TUNABLES', 'LD_PRELOAD')
LR, MOMENTUM = 0.01, 0.9


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default=','.join(DEFAULT_MODELS))
  p.add_argument('--configs', default=','.join(CONFIGS), help=f'any of {", ".join(CONFIGS)}')
  p.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--iters', type=int, default=5, help='timed steps')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps first (the first compiles)')
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--threads', type=int, default=2,
                 help='CPUs each worker is pinned to (and torch threads)')
  p.add_argument('--timeout', type=int, default=1800, help='seconds per worker process')
  p.add_argument('--out', default=None, help='write the JSON here (after every worker)')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for flag, value, known in (('--configs', args.configs, CONFIGS),
                             ('--frameworks', args.frameworks, FRAMEWORKS)):
    bad = [v for v in value.split(',') if v not in known]
    if bad:
      p.error(f'{flag}: unknown {", ".join(bad)}; choose from {", ".join(known)}')
  if args.rounds < 1 or args.iters < 1 or args.batch < 1:
    p.error('--rounds, --iters and --batch must be at least 1')
  return args


# ----------------------------------------------------------------------------- worker side

def _proc_maps_mention(name: str) -> bool:
  try:
    with open('/proc/self/maps') as f:
      return any(name in line for line in f)
  except OSError:
    return False


def _pin(threads: int) -> list[int]:
  """Restricts this process to its first `threads` allowed CPUs (before any runtime starts)."""
  if not hasattr(os, 'sched_setaffinity'):
    return []
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) > threads:
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  return cpus


def _checks(spec: dict, mallopt_applied: bool | None) -> dict:
  """What this process really runs with, so a config that did not apply is visible."""
  from tljax.cpu_backend import allocator
  checks = {'tunables': allocator.tunables_active(),
            'block_cache': allocator.block_cache_active()}
  if mallopt_applied is not None:
    checks['mallopt'] = mallopt_applied
  library = spec.get('library')
  if library:
    checks['preloaded'] = _proc_maps_mention(os.path.basename(library))
  return checks


class _FaultCounter:
  """Wraps a step so the minor page faults of the calls after the untimed ones are counted.

  `experiments.timing.measure` makes max(1, warmup) untimed calls, then the
  timed ones; the count starts as the first timed call begins and ends when
  `stop()` is called after `measure` returns (so the last sync is inside).
  """

  def __init__(self, call, untimed: int):
    self.call, self.untimed, self.calls, self.start = call, untimed, 0, None

  def __call__(self):
    if self.calls == self.untimed:
      self.start = _minflt()
    self.calls += 1
    return self.call()

  def stop(self, timed: int) -> float | None:
    if self.start is None or not timed:
      return None
    return (_minflt() - self.start) / timed


def _minflt() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_mb() -> float | None:
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError, IndexError):
    return None


def _timed(step, sync, spec: dict) -> dict:
  """`measure` of `step`, with faults per timed step and memory figures."""
  import resource

  from experiments.timing import measure
  counter = _FaultCounter(step, max(1, spec['warmup']))
  timing = measure(counter, sync, iters=spec['iters'], warmup=spec['warmup'])
  timing['minor_faults_per_step'] = counter.stop(len(timing['samples']))
  timing['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  timing['rss_end_mb'] = _rss_mb()
  return timing


def _tljax_step(spec: dict):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from tljax import models, ops
  name, batch, size = spec['model'], spec['batch'], spec['size']
  model = models.create(name, 1000)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optax.sgd(LR, momentum=MOMENTUM)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  dropout_key = jax.random.key(1)

  def loss_fn(params, batch_stats, x, y):
    logits, updated = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                  rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updated['batch_stats']

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  state = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state}

  def step():
    state['params'], state['batch_stats'], state['opt_state'], loss = train_step(
        state['params'], state['batch_stats'], state['opt_state'], images, labels)
    return loss

  return step, jax.block_until_ready, {'ops_backend': ops.active_backend()}


def _torch_step(spec: dict):
  import numpy as np
  import torch

  from experiments.bench_torch import build
  torch.set_num_threads(spec['threads'])
  model, _ = build(spec['model'])
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  loss_fn = torch.nn.CrossEntropyLoss()
  rng = np.random.default_rng(0)
  batch, size = spec['batch'], spec['size']
  images = torch.from_numpy(rng.standard_normal((batch, 3, size, size), np.float32))
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(rng.integers(0, 1000, (batch,)))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  return step, lambda _: None, {'torch_threads': torch.get_num_threads()}


# glibc <malloc.h> parameter numbers and the in-process settings the 'mallopt' config tries.
MALLOPT = {-8: 1,             # M_ARENA_MAX
           -3: 1 << 30,       # M_MMAP_THRESHOLD (an int: at most 2 GiB - 1)
           -1: (1 << 31) - 1,  # M_TRIM_THRESHOLD
           -2: 64 << 20}      # M_TOP_PAD


def _mallopt() -> bool:
  """Applies `MALLOPT` with glibc's mallopt; True if every call succeeded."""
  import ctypes  # noqa: PLC0415
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in MALLOPT.items())


def run_worker(spec: dict) -> dict:
  """One (config, framework, model) in this process; started by `launch`."""
  cpus = _pin(spec['threads'])
  # Every worker imports this (and with it JAX) first, so the configs differ only in the call.
  from tljax.cpu_backend import allocator
  mallopt_applied = None
  if spec['config'] == 'mallopt':  # before JAX or torch allocate anything big
    mallopt_applied = _mallopt()
  build = _tljax_step if spec['framework'] == 'tljax' else _torch_step
  step, sync, info = build(spec)
  result = {'timing': _timed(step, sync, spec), 'cpus': cpus, **info}
  result['checks'] = _checks(spec, mallopt_applied)
  return result


# ----------------------------------------------------------------------------- parent side

def base_environ() -> tuple[dict[str, str], list[str]]:
  """This process's environment without inherited allocator settings, and what was dropped."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2')
  dropped = [f'{k}={env.pop(k)}' for k in INHERITED_ALLOCATOR_VARS if k in env]
  return env, dropped


def config_environ(name: str, base: dict[str, str]) -> tuple[dict[str, str] | None, str]:
  """(environment, description) for one config, or (None, why it is skipped)."""
  from tljax.cpu_backend import allocator
  if name in ('glibc', 'mallopt'):
    if name == 'mallopt' and not (platform.system() == 'Linux'
                                  and platform.libc_ver()[0] == 'glibc'):
      return None, 'mallopt needs glibc on Linux'
    return dict(base), ('environment as started' if name == 'glibc'
                        else 'mallopt (MALLOPT) first thing in the worker')
  if name == 'tunables':
    env = allocator.allocator_environ(dict(base, TLJAX_HOST_BLOCK_CACHE='0'))
    if not allocator.tunables_active(env):
      return None, 'glibc tunables need glibc on Linux'
    return env, f'GLIBC_TUNABLES={env["GLIBC_TUNABLES"]}'
  if name == 'tunables+shim':
    env = allocator.allocator_environ(base)
    if not allocator.tunables_active(env):
      return None, 'glibc tunables need glibc on Linux'
    if 'tljax_hostalloc_' not in env.get('LD_PRELOAD', ''):
      return None, 'the huge-block cache could not be built or is switched off here'
    return env, f'GLIBC_TUNABLES={env["GLIBC_TUNABLES"]} LD_PRELOAD={env["LD_PRELOAD"]}'
  library = LIBRARIES[name]
  if not os.path.exists(library):
    return None, f'{library} is not installed'
  return dict(base, LD_PRELOAD=library), f'LD_PRELOAD={library}'


def launch(spec: dict, env: dict[str, str], timeout: float) -> dict:
  """Runs `spec` in a fresh interpreter under `env`; {'error': ...} if it fails or times out."""
  cmd = [sys.executable, '-m', 'experiments.allocators', '--worker', json.dumps(spec)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'worker cut at {timeout:.0f}s'}
  for line in proc.stdout.splitlines():
    if line.startswith(MARK):
      return json.loads(line[len(MARK):])
  last = (proc.stderr.strip().splitlines() or ['no output'])[-1][:300]
  return {'error': f'exit {proc.returncode}: {last}'}


def plan(args, configs: list[str]) -> list[dict]:
  """Every worker to start, in order: per round and model, configs in turn with the frameworks
  back to back; odd rounds backwards."""
  frameworks = args.frameworks.split(',')
  out = []
  for r in range(args.rounds):
    for model in filter(None, args.models.split(',')):
      order = [(c, fw) for c in configs for fw in frameworks]
      out += [dict(round=r, model=model, config=c, framework=fw)
              for c, fw in (order if r % 2 == 0 else order[::-1])]
  return out


def pooled(old: dict | None, new: dict) -> dict:
  """One (model, config, framework) entry over rounds: timings pooled, per-round figures kept."""
  from experiments.benchmark import pool
  if 'error' in new:
    if old is None:
      return {'error': new['error']}
    return dict(old, round_errors=old.get('round_errors', []) + [new['error']])
  t = new['timing']
  rounds = {'minor_faults_per_step': [t['minor_faults_per_step']],
            'peak_rss_mb': [t['peak_rss_mb']], 'rss_end_mb': [t['rss_end_mb']]}
  if old is None or 'timing' not in old:
    earlier = [old['error']] if old else []
    return dict(new, rounds=rounds, **({'round_errors': earlier} if earlier else {}))
  merged = dict(old, timing=pool(old['timing'], t), checks=new['checks'])
  merged['rounds'] = {k: old['rounds'][k] + v for k, v in rounds.items()}
  return merged


def _median(values) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def summary(entry: dict | None) -> dict:
  """s/step (median of pooled samples), faults/step (median over rounds), peak RSS (max)."""
  if not entry or 'timing' not in entry:
    return {}
  rounds = entry['rounds']
  return {'s': entry['timing']['median_s'],
          'faults': _median(rounds['minor_faults_per_step']),
          'rss': max(v for v in rounds['peak_rss_mb'] if v is not None)}


def _fmt(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def table(result: dict) -> str:
  meta = result['meta']
  lines = [f'batch {meta["batch"]}, {meta["size"]} px, {meta["threads"]} threads, '
           f'{meta["iters"]} timed steps after {meta["warmup"]} warm-up, {meta["rounds"]} '
           'round(s); torch ÷ tljax > 1: tljax is faster', '',
           '| model | config | tljax s/step | tljax img/s | torch s/step | torch ÷ tljax | '
           'tljax faults/step | tljax peak RSS MB | torch faults/step | torch peak RSS MB |',
           '|---|---|---|---|---|---|---|---|---|---|']
  entries = result['results']
  for model in meta['models']:
    for config in meta['configs']:
      if config in meta['skipped']:
        lines.append(f'| {model} | {config} | skipped: {meta["skipped"][config]} |'
                     + ' |' * 7)
        continue
      ours = summary(entries.get(f'{model}/{config}/tljax'))
      theirs = summary(entries.get(f'{model}/{config}/torch'))
      t, u = ours.get('s'), theirs.get('s')
      lines.append('| ' + ' | '.join([
          model, config, _fmt(t, '.3f'), _fmt(meta['batch'] / t if t else None, '.1f'),
          _fmt(u, '.3f'), _fmt(u / t if t and u else None, '.2f'),
          _fmt(ours.get('faults'), ',.0f'), _fmt(ours.get('rss'), ',.0f'),
          _fmt(theirs.get('faults'), ',.0f'), _fmt(theirs.get('rss'), ',.0f')]) + ' |')
  errors = [f'- {key}: {e["error"]}' for key, e in entries.items() if 'error' in e]
  unapplied = [f'- {key}: {e["checks"]}' for key, e in entries.items()
               if not _applied(key.split('/')[1], e.get('checks'))]
  if errors:
    lines += ['', 'Failed workers:', *errors]
  if unapplied:
    lines += ['', 'Workers whose allocator config did not take effect:', *unapplied]
  return '\n'.join(lines)


def _applied(config: str, checks: dict | None) -> bool:
  if checks is None:
    return True
  expected = {'glibc': dict(tunables=False, block_cache=False),
              'mallopt': dict(mallopt=True, tunables=False, block_cache=False),
              'tunables': dict(tunables=True, block_cache=False),
              'tunables+shim': dict(tunables=True, block_cache=True)}.get(
                  config, dict(preloaded=True, tunables=False, block_cache=False))
  return all(checks.get(k) == v for k, v in expected.items())


def metadata(args, argv, configs, described, skipped, dropped) -> dict:
  from experiments.benchmark import metadata as bench_metadata
  meta = {k: v for k, v in bench_metadata(
      argparse.Namespace(threads=args.threads, batch=args.batch, iters=args.iters,
                         warmup=args.warmup, rounds=args.rounds, malloc='per config', gpu=False,
                         peak_tflops=None, smoke=False), []).items()
          if k not in ('malloc_tuned', 'host_block_cache', 'gpu', 'peak_tflops', 'smoke',
                       'command')}
  meta.update(size=args.size, models=[m for m in args.models.split(',') if m], configs=configs,
              frameworks=args.frameworks.split(','), config_environ=described, skipped=skipped,
              dropped_from_environ=dropped,
              command='python -m experiments.allocators ' + ' '.join(map(shlex.quote, argv)))
  return meta


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    print(MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
    return
  base, dropped = base_environ()
  if dropped:
    print(f'note: dropped from every worker\'s environment: {"; ".join(dropped)}', flush=True)
  configs = args.configs.split(',')
  environs, described, skipped = {}, {}, {}
  for name in configs:
    env, text = config_environ(name, base)
    if env is None:
      skipped[name] = text
      print(f'skipping {name}: {text}', flush=True)
    else:
      environs[name], described[name] = env, text
  result = {'meta': metadata(args, argv, configs, described, skipped, dropped), 'results': {}}
  spec_base = dict(batch=args.batch, size=args.size, iters=args.iters, warmup=args.warmup,
                   threads=args.threads)
  start = time.monotonic()
  for job in plan(args, [c for c in configs if c in environs]):
    spec = dict(spec_base, **job, library=LIBRARIES.get(job['config']))
    key = f'{job["model"]}/{job["config"]}/{job["framework"]}'
    print(f'[round {job["round"] + 1}] {key}', end=' ', flush=True)
    got = launch(spec, environs[job['config']], args.timeout)
    if 'error' in got:
      print(f'n/a ({got["error"]})', flush=True)
    else:
      t = got['timing']
      print(f'{t["median_s"]:.3f} s/step, {t["minor_faults_per_step"] or 0:,.0f} faults/step, '
            f'peak RSS {t["peak_rss_mb"]:,.0f} MB', flush=True)
    result['results'][key] = pooled(result['results'].get(key), got)
    if args.out:
      _write(args.out, result)
  result['meta']['wall_s'] = round(time.monotonic() - start, 1)
  if args.out:
    _write(args.out, result)
  print('\n' + table(result))
  print('\nNote: CPU timings are only meaningful on an otherwise idle machine.')


def _write(path: str, result: dict):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


if __name__ == '__main__':
  main()
