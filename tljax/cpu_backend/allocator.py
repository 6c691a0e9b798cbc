"""glibc malloc settings that stop CPU runs from paying page faults on every step.

XLA:CPU (and torch on CPU) allocate each step's activations afresh. With
glibc's defaults a block above the mmap threshold (≤ 32 MiB), and any block
that does not fit a thread's 64 MiB secondary arena, is mmap'ed and unmapped
again on every call, so each step touches fresh pages and the kernel zeroes
them: on our 2-core VM adding two 58 MB arrays took 49 ms instead of 4.8 ms,
and a depthwise-conv kernel gradient 148 ms instead of 19 ms. One arena with
a high mmap threshold and no trimming keeps freed memory in the process for
the next step. The cost is that peak memory is never handed back to the OS,
which is what a training process wants anyway.

`mallopt` takes an `int`, so it cannot raise the mmap threshold past 2 GiB,
and XLA:CPU asks for a whole step's temporaries in one block: 3.4 GB for a
MobileNetV2 fine-tuning step at batch 32, mmap'ed and zeroed afresh every
step (850k page faults, 2.0 s instead of 1.25 s). glibc's tunables take
64-bit sizes but are read only at process start, so entry points that run
many steps (`tljax.main`, the benchmark's workers) start (or re-execute)
their process with `allocator_environ()`; `tune_host_allocator()` is the
in-process fallback for library users.

Inside the heap, that one block is reused only while nothing else lands in
the hole it leaves, and the runtime thread that frees a step's block can lose
the race against the next step's request: the heap then grows by the whole
block (MobileNetV2: 4.4 → 9.5 GB of RSS over 100 steps, 3.4 s for each step
that grew it). So `allocator_environ()` also preloads `csrc/hostalloc.c`
(built like the C++ kernels), which gives blocks of 64 MiB and more their own
mappings and keeps them for the next request; `TLJAX_HOST_BLOCK_CACHE=0`
leaves it out.

This changes process-wide state, so it is opt-in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
import warnings
from typing import Mapping

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_SETTINGS = {
    _M_ARENA_MAX: 1,
    _M_MMAP_THRESHOLD: 1 << 30,
    _M_TRIM_THRESHOLD: (1 << 31) - 1,
    _M_TOP_PAD: 64 << 20,
}

_state = {'tuned': False}

# The same settings as glibc tunables (64-bit sizes); see `allocator_environ`.
TUNABLES = {
    'glibc.malloc.arena_max': 1,
    'glibc.malloc.mmap_threshold': 64 << 30,
    'glibc.malloc.trim_threshold': 128 << 30,
    'glibc.malloc.top_pad': 64 << 20,
}


def _is_glibc_linux() -> bool:
  return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def _parse_tunables(value: str) -> dict[str, str]:
  return dict(item.split('=', 1) for item in value.split(':') if '=' in item)


def block_cache_library(environ: Mapping[str, str] | None = None) -> str | None:
  """The huge-block cache to preload (built on first use), or None with the reason warned.

  None without a warning where it does not apply: not glibc, or
  TLJAX_HOST_BLOCK_CACHE=0 in `environ`.
  """
  from tljax.cpu_backend import native
  env = os.environ if environ is None else environ
  if (not native.switch(env, 'TLJAX_HOST_BLOCK_CACHE', 'preload the huge-block cache',
                        'glibc only') or not _is_glibc_linux()):
    return None
  try:
    return str(native.host_allocator())
  except (OSError, RuntimeError) as e:
    warnings.warn(f'tljax: no huge-block cache ({e}); large CPU steps may grow the heap. '
                  'Set TLJAX_HOST_BLOCK_CACHE=0 to silence this.')
    return None


def allocator_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """`environ` (default: this process's) with `TUNABLES` in GLIBC_TUNABLES and the
  huge-block cache (`block_cache_library`) first in LD_PRELOAD.

  Settings the caller already put in GLIBC_TUNABLES or LD_PRELOAD are kept.
  """
  env = dict(os.environ if environ is None else environ)
  merged = _parse_tunables(env.get('GLIBC_TUNABLES', ''))
  for key, value in TUNABLES.items():
    merged.setdefault(key, str(value))
  env['GLIBC_TUNABLES'] = ':'.join(f'{k}={v}' for k, v in merged.items())
  cache = block_cache_library(env)
  preload = [p for p in env.get('LD_PRELOAD', '').replace(' ', ':').split(':') if p]
  if cache and cache not in preload:
    env['LD_PRELOAD'] = ':'.join([cache, *preload])
  return env


def block_cache_active() -> bool:
  """True if this process runs with the huge-block cache preloaded."""
  try:
    with open('/proc/self/maps') as f:
      return any('tljax_hostalloc_' in line for line in f)
  except OSError:
    return False


def tunables_active(environ: Mapping[str, str] | None = None) -> bool:
  """True if `environ` (default: this process's) holds every `TUNABLES` key in GLIBC_TUNABLES."""
  env = os.environ if environ is None else environ
  current = _parse_tunables(env.get('GLIBC_TUNABLES', ''))
  return _is_glibc_linux() and all(key in current for key in TUNABLES)


def accelerator_plugins() -> list[str]:
  """JAX plugins for GPUs or TPUs installed here (`jax_plugins` modules, entry points, libtpu).

  Read from package metadata: initialising JAX to ask would be too early for
  `jax.distributed.initialize`, which must come first.
  """
  names = []
  try:
    import jax_plugins  # noqa: PLC0415
    names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  names += [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return sorted(set(names))


def runs_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will pick the CPU: JAX_PLATFORMS' first entry if set, else no accelerator
  plugin installed."""
  env = os.environ if environ is None else environ
  platforms = (env.get('JAX_PLATFORMS') or env.get('JAX_PLATFORM_NAME') or '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_plugins()


def restart_environ(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
  """The environment to restart this process under, or None to leave the process alone.

  None unless the CPU backend will run (`runs_on_cpu`, `TLJAX_OPS` not `xla`) on
  glibc without the settings already applied: GPU and TPU hosts, and runs that
  switched the backend off, are never touched.
  """
  from tljax import ops  # noqa: PLC0415
  env = os.environ if environ is None else environ
  if (ops.requested(env) == 'xla' or not runs_on_cpu(env) or not _is_glibc_linux()
      or tunables_active(env)):
    return None
  return allocator_environ(env)


def restart_with_tuned_allocator() -> bool:
  """Restarts this process (same pid, same command line) under `restart_environ()`.

  Returns False (and does nothing) where that is None; otherwise does not
  return. Call it before the process has done anything worth keeping: it
  starts over from `main`.
  """
  environ = restart_environ()
  if environ is None:
    return False
  argv = [sys.executable, *getattr(sys, 'orig_argv', [sys.executable, *sys.argv])[1:]]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ)
  return True  # pragma: no cover — execve does not return


def describe() -> str:
  """One line: what this process runs with on the host (for the run's log)."""
  from tljax.cpu_backend import native  # noqa: PLC0415
  kernels = 'C++ kernels' if native.available() else 'pure-JAX kernels (no C++ build)'
  if tunables_active():
    cache = ' + huge-block cache (LD_PRELOAD)' if block_cache_active() else ''
    memory = f'glibc malloc tunables{cache}; --notune_malloc leaves the process as started'
  else:
    memory = 'malloc as started'
  return f'CPU backend: {kernels}; {memory}'


def tune_host_allocator() -> bool:
  """Applies the settings above; True if they are in effect (glibc on Linux), else False.

  Call before the first large allocation (before building models): threads
  that already own an arena keep it. Calling again is harmless.
  """
  if _state['tuned'] or tunables_active():
    return True   # the start-up tunables are stronger (mallopt would lower their thresholds)
  if not _is_glibc_linux():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  _state['tuned'] = all(mallopt(param, value) == 1 for param, value in _SETTINGS.items())
  return _state['tuned']

