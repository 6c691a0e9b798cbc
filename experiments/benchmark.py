"""Benchmark suite: tljax vs torchvision vs Keras 3, CPU or GPU, one command.

  python -m experiments.benchmark --out=bench.json                # CPU, everything
  python -m experiments.benchmark --models=mobilenet_v2 --batch=8 --iters=3 --no-micro
  python -m experiments.benchmark --gpu --peak_tflops=989 --out=gpu.json    # H100, bf16
  python -m experiments.benchmark --smoke                         # every code path, tiny
  python -m experiments.benchmark --rounds=3 --models=resnet34     # interleaved, for a noisy host

Each (framework, model, dtype) runs in its own Python process, so one
framework's threads, allocator state or crash cannot touch another's numbers;
a framework or model that is missing or fails is reported as n/a. The JSON
written to --out holds every sample; `tools/perf_readme.py` renders it.
Run on a quiet machine: the timings are medians, not magic. On a shared one,
--rounds=N repeats every model job N times, alternating the frameworks'
order, so each framework is sampled across the same stretch of time and a
slow minute from a neighbour lands on both sides of a ratio; the samples of
all rounds are pooled and each round's median is kept.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

DEFAULT_MODELS = ('resnet34', 'resnet50', 'mobilenet_v2', 'mobilenet_v3_large',
                  'efficientnet_lite0', 'inception_v3')
SMOKE_MODELS = ('mobilenet_v2', 'resnet50')
MARK = '@@BENCH-RESULT@@'
PARTIAL = '@@BENCH-PARTIAL@@'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default=','.join(DEFAULT_MODELS),
                 help='comma-separated tljax model names; empty: microbenchmarks only')
  p.add_argument('--batch', type=int, default=None, help='default 32 (CPU), 128 (GPU)')
  p.add_argument('--iters', type=int, default=None, help='timed iterations (default 5 CPU, 20 GPU)')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed calls first (1 compiles; a big step block may be mapped twice before '
                      'the allocator reuses it, see tljax/cpu_backend/csrc/hostalloc.c)')
  p.add_argument('--size', type=int, default=None, help='override every model\'s input size')
  p.add_argument('--dtypes', default=None, help='default float32 (CPU), bfloat16 (GPU)')
  p.add_argument('--frameworks', default='tljax,torch-eager,torch-compile,keras')
  p.add_argument('--impls', default=None,
                 help='tljax ops backends: fast (tljax.ops.use_backend("cpu"): the CPU backend) '
                      'and/or xla (plain lax ops); default fast,xla (CPU), xla (GPU)')
  p.add_argument('--modes', default='inference,head_step,full_step,cached_head_step')
  p.add_argument('--rounds', type=int, default=1,
                 help='run every model job this many times, frameworks interleaved; tljax\'s '
                      'second and later --impls (the non-default paths) run in round 1 only')
  p.add_argument('--micro', action=argparse.BooleanOptionalAction, default=None,
                 help='single-conv microbenchmarks (default: on for CPU)')
  p.add_argument('--micro_batch', type=int, default=32)
  p.add_argument('--gpu', action='store_true', help='run on the GPU: bf16, torch AMP, MFU')
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='accelerator peak for MFU (H100 SXM bf16 dense: 989)')
  p.add_argument('--threads', type=int, default=None,
                 help='torch threads (default: CPUs this process may use, as XLA does)')
  p.add_argument('--malloc', choices=('tuned', 'default'), default='tuned',
                 help='every worker starts on the allocator tljax.main picks on CPU (tcmalloc, '
                      'else glibc tunables and the huge-block cache; '
                      'tljax.cpu_backend.allocator), so every framework gets it')
  p.add_argument('--smoke', action='store_true', help='tiny settings: checks every code path')
  p.add_argument('--timeout', type=int, default=3600, help='seconds per worker process')
  p.add_argument('--budget_s', type=float, default=None,
                 help='stop starting jobs after this many seconds and cut the running one '
                      '(default 500 with --gpu, to end inside a 10-minute command)')
  p.add_argument('--out', default=None, help='write the JSON here')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  _fill_defaults(args)
  return args


def _fill_defaults(args):
  if args.smoke:
    args.models = args.models if args.models != ','.join(DEFAULT_MODELS) else ','.join(SMOKE_MODELS)
    args.batch, args.iters, args.warmup = args.batch or 2, args.iters or 1, 1
    args.size = args.size or 96
    args.micro_batch = 2
    args.impls = args.impls or ('xla' if args.gpu else 'fast')
  args.batch = args.batch or (128 if args.gpu else 32)
  args.iters = args.iters or (20 if args.gpu else 5)
  args.dtypes = args.dtypes or ('bfloat16' if args.gpu else 'float32')
  args.impls = args.impls or ('xla' if args.gpu else 'fast,xla')
  if args.micro is None:
    args.micro = not args.gpu
  if args.budget_s is None and args.gpu:
    args.budget_s = 500.0
  if args.rounds < 1:
    raise SystemExit(f'--rounds must be at least 1, got {args.rounds}')
  if args.threads is None:
    args.threads = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                    else os.cpu_count())


# ----------------------------------------------------------------------------- workers

def _report_partial(framework: str, mode: str, timing: dict):
  print(PARTIAL + json.dumps({'framework': framework, 'mode': mode, 'timing': timing}), flush=True)


def run_worker(spec: dict) -> dict:
  """Runs one job in this process (called in a child started by `launch`)."""
  kind = spec['kind']
  if kind.startswith('micro'):
    from experiments import bench_micro
    return {'micro': bench_micro.run(
        batch=spec['batch'], iters=spec['iters'], warmup=spec['warmup'], dtypes=[spec['dtype']],
        impls=('xla', 'fast') if kind == 'micro-jax' else (),
        with_torch=kind == 'micro-torch', names=tuple(spec.get('names', ())))}
  if kind == 'tljax':
    import jax
    if spec['gpu'] and jax.default_backend() == 'cpu':
      raise RuntimeError('--gpu was given but JAX sees no GPU (jax.default_backend() == "cpu").')
    from experiments import bench_tljax
    return bench_tljax.run_model(spec['model'], batch=spec['batch'], dtype=spec['dtype'],
                                 impls=spec['impls'], iters=spec['iters'], warmup=spec['warmup'],
                                 size=spec['size'], modes=tuple(spec['modes']),
                                 on_result=_report_partial)
  if kind.startswith('torch'):
    from experiments import bench_torch
    return {'results': bench_torch.run_model(
        spec['model'], batch=spec['batch'], size=spec['size'], dtype=spec['dtype'],
        device='cuda' if spec['gpu'] else 'cpu', modes_to_run=spec['modes'], iters=spec['iters'],
        warmup=spec['warmup'], compile_modes=(kind.split('-', 1)[1],), threads=spec['threads'],
        on_result=_report_partial)}
  if kind == 'keras':
    from experiments import bench_keras
    return {'results': bench_keras.run_model(spec['model'], batch=spec['batch'], size=spec['size'],
                                             dtype=spec['dtype'], modes_to_run=spec['modes'],
                                             iters=spec['iters'], warmup=spec['warmup'],
                                             on_result=_report_partial)}
  raise ValueError(f'unknown worker kind {kind!r}')


def launch(spec: dict, timeout: float) -> dict:
  """Runs `spec` in a fresh interpreter, echoing its progress.

  A worker that fails or is cut at `timeout` keeps the measurements it had
  reported; the rest become {'error': ...}.
  """
  env = dict(os.environ, KERAS_BACKEND='jax', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2')
  if not spec['gpu']:
    env['JAX_PLATFORMS'] = 'cpu'
  if spec['malloc'] == 'tuned':
    from tljax.cpu_backend.allocator import process_environ
    env = process_environ(env)
  cmd = [sys.executable, '-m', 'experiments.benchmark', '--worker', json.dumps(spec)]
  where = f' round {spec["round"] + 1}' if spec.get('round') else ''
  print(f'[{spec["kind"]}] {spec.get("model", "")} {spec["dtype"]}{where}', flush=True)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cut = threading.Event()
  watchdog = threading.Timer(max(1.0, timeout), lambda: (cut.set(), proc.kill()))
  watchdog.start()
  stderr_tail: collections.deque = collections.deque(maxlen=20)
  drain = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)
  drain.start()
  result, partial = None, {}
  for line in proc.stdout:
    if line.startswith(MARK):
      result = json.loads(line[len(MARK):])
    elif line.startswith(PARTIAL):
      item = json.loads(line[len(PARTIAL):])
      partial.setdefault(item['framework'], {})[item['mode']] = item['timing']
    elif line.strip():
      print(line.rstrip(), flush=True)
  proc.wait()
  watchdog.cancel()
  drain.join(timeout=5)
  if result is not None:
    return result
  last = (''.join(stderr_tail).strip().splitlines() or ['no output'])[-1][:300]
  reason = f'worker cut at {timeout:.0f}s' if cut.is_set() else f'exit {proc.returncode}: {last}'
  print(f'  {reason}', flush=True)
  return {'error': reason, 'partial': partial}


def _available(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- suite

def metadata(args, argv) -> dict:
  versions = {}
  for dist in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'keras', 'numpy'):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  cpu = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
  except OSError:
    pass
  try:
    git = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                         check=False).stdout.strip() or None
  except OSError:
    git = None
  meta = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
          'cpu': cpu, 'cpus': os.cpu_count(), 'threads': args.threads,
          'platform': platform.platform(),
          'python': platform.python_version(), 'versions': versions, 'batch': args.batch,
          'iters': args.iters, 'warmup': args.warmup, 'rounds': args.rounds,
          'malloc_tuned': args.malloc == 'tuned', 'host_block_cache': _block_cache(args),
          'host_allocator': _host_allocator(args),
          'gpu': args.gpu, 'peak_tflops': args.peak_tflops, 'git': git, 'smoke': args.smoke,
          'native_kernels': _native_kernels(),
          'command': 'python -m experiments.benchmark ' + ' '.join(shlex.quote(a) for a in argv)}
  if args.gpu and _available('torch'):
    try:
      import torch
      meta['gpu_name'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 — a name is a nicety.
      pass
  return meta


def _block_cache(args) -> bool:
  """Whether every worker runs with tljax's huge-block cache preloaded (part of --malloc=tuned)."""
  if args.malloc != 'tuned':
    return False
  from tljax.cpu_backend.allocator import process_environ
  return 'tljax_hostalloc_' in process_environ().get('LD_PRELOAD', '')


def _host_allocator(args) -> str | None:
  """'tcmalloc' or 'glibc': what --malloc=tuned gives every worker (as `tljax.main` would)."""
  if args.malloc != 'tuned':
    return None
  from tljax.cpu_backend.allocator import malloc_choice
  return malloc_choice()


def _native_kernels() -> str:
  """Whether tljax's CPU workers run the C++ kernels (`tljax.cpu_backend.native`): built here
  or not."""
  from tljax.cpu_backend import native
  try:
    return 'on' if native.available() else 'off (no compiler, a failed build or TLJAX_NATIVE=0)'
  except ValueError as exc:
    return f'off ({exc})'


def jobs(args) -> list[dict]:
  base = dict(batch=args.batch, iters=args.iters, warmup=args.warmup, gpu=args.gpu, size=args.size,
              malloc=args.malloc, threads=args.threads, modes=args.modes.split(','),
              impls=args.impls.split(','))
  frameworks = args.frameworks.split(',')
  models = [m for m in args.models.split(',') if m]
  out = []
  for dtype in args.dtypes.split(','):
    if args.micro:
      micro = dict(base, batch=args.micro_batch, dtype=dtype, names=())
      out.append(dict(micro, kind='micro-jax'))
      if 'torch-eager' in frameworks and not args.gpu:
        out.append(dict(micro, kind='micro-torch'))
    # torch.compile is the slowest to start: on a budget it is the one left out.
    first = [fw for fw in frameworks if fw != 'torch-compile' and not (fw == 'keras' and args.gpu)]
    for group in (first, [fw for fw in frameworks if fw == 'torch-compile']):
      for r in range(args.rounds):
        order = group if r % 2 == 0 else group[::-1]
        for model in models:
          out.extend(dict(base, kind=fw, model=model, dtype=dtype, round=r,
                          impls=base['impls'] if r == 0 else base['impls'][:1]) for fw in order)
  return out


def pool(old: dict, new: dict) -> dict:
  """One measurement from two rounds' timings: samples pooled, each round's median kept."""
  if 'samples' not in new:
    if 'samples' not in old:
      return new
    return dict(old, round_errors=old.get('round_errors', []) + [new.get('error')])
  if 'samples' not in old:
    return dict(new, round_medians=[new['median_s']])
  samples = old['samples'] + new['samples']
  return dict(old, samples=samples, median_s=statistics.median(samples), min_s=min(samples),
              round_medians=old.get('round_medians', [old['median_s']]) + [new['median_s']])


def merge(job: dict, result: dict, suite: dict, sizes: dict):
  if job['kind'].startswith('micro'):
    rows = {(r['case'], r['dtype']): r for r in suite['micro']}
    for row in result.get('micro', []):
      key = (row['case'], row['dtype'])
      if key in rows:
        rows[key]['results'].update(row['results'])
      else:
        suite['micro'].append(row)
        rows[key] = row
    return
  key = (job['model'], job['dtype'])
  row = next((r for r in suite['models'] if (r['model'], r['dtype']) == key), None)
  if row is None:
    row = {'model': job['model'], 'dtype': job['dtype'], 'batch': job['batch'],
           'input_size': sizes.get(job['model']), 'results': {}}
    suite['models'].append(row)
  if 'error' in result:
    names = ([f'tljax-{i}' for i in job['impls']] if job['kind'] == 'tljax' else [job['kind']])
    results = {}
    for name in names:
      got = result.get('partial', {}).get(name, {})
      results[name] = ({mode: got.get(mode, {'error': result['error']}) for mode in job['modes']}
                       if got else {'error': result['error']})
  else:
    for k in ('input_size', 'params', 'flops', 'opt_state_bytes'):
      if k in result:
        row[k] = result[k]
    results = result['results']
  for name, timings in results.items():
    have = row['results'].get(name, {})
    have = {} if 'error' in have else have
    if 'error' in timings and have:  # failed this round only: earlier rounds' samples stay
      timings = {mode: timings for mode in have}
    if 'error' in timings:
      row['results'][name] = timings
      continue
    row['results'][name] = dict(have, **{mode: pool(have.get(mode, {}), timing)
                                         for mode, timing in timings.items()})


def input_sizes(args) -> dict:
  from tljax import models
  sizes = {}
  for name in filter(None, args.models.split(',')):
    try:
      sizes[name] = args.size or models.input_size(name)
    except Exception as exc:  # noqa: BLE001 — reported per model below.
      print(f'note: {name}: {exc}', flush=True)
      sizes[name] = args.size or 224
  return sizes


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    spec = json.loads(args.worker)
    print(MARK + json.dumps(run_worker(spec)), flush=True)
    return
  start = time.monotonic()
  suite = {'meta': metadata(args, argv), 'micro': [], 'models': []}
  sizes = input_sizes(args)
  for job in jobs(args):
    timeout = args.timeout
    if args.budget_s is not None:
      timeout = min(timeout, args.budget_s - (time.monotonic() - start))
      if timeout < 10:
        suite['meta'].setdefault('skipped', []).append(f'{job["kind"]} {job.get("model", "")}')
        continue
    job['size'] = job['size'] or sizes.get(job.get('model'))
    merge(job, launch(job, timeout), suite, sizes)
    if args.out:
      _write(args.out, suite)
  if suite['meta'].get('skipped'):
    print(f'budget of {args.budget_s:.0f}s spent; skipped: {", ".join(suite["meta"]["skipped"])}')
    if args.out:
      _write(args.out, suite)
  from experiments.bench_tables import markdown
  print('\n' + markdown(suite))
  if not args.gpu:
    print('Note: CPU timings are only meaningful on an otherwise idle machine.')


def _write(path: str, suite: dict):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(suite, f, indent=1)
  os.replace(tmp, path)


if __name__ == '__main__':
  main()
