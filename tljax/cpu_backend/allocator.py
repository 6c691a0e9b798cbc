"""Host memory for CPU training: why a step pays page faults, and what stops it.

XLA:CPU allocates each execution's temporaries as one block (about 1.8 GB
for an EfficientNet-Lite0 fine-tuning step at batch 32, 224 px). That is far
above glibc's mmap threshold (at most 32 MiB by default), so every step maps
a fresh block and the kernel zeroes it page by page: 452k minor faults per
step in `experiments/results/issue15_2core/allocators_c5df9fc.json` ('glibc').
Raising the threshold in-process with `mallopt` did not help there (it is an
`int`, and the block lands in a heap whose hole the next step does not reuse):
the 'mallopt' row is slower than glibc's defaults.

glibc's tunables, read only at process start, keep such blocks in one heap
with no trimming (`TUNABLES`; 715 faults per step), and the huge-block cache
(`csrc/hostalloc.c`, preloaded, built like the C++ kernels) gives blocks of
64 MiB and more their own mappings kept for the next request, so the heap
cannot grow by a whole block when a runtime thread frees it late. Of the
maintained allocators, jemalloc and mimalloc at their defaults fault like
glibc; tcmalloc runs the step as fast but held 4.2 GB peak against the
cache's 2.5 GB in three of four runs, with faults that varied from 0 to 181k
per step; so the cache stays the default and TLJAX_MALLOC=tcmalloc is the
opt-in alternative.

Only CPU runs are touched: `tljax.main` restarts itself once under
`process_environ()` when JAX will run on CPU with the CPU backend on
(`restart_environ`), never on GPU/TPU hosts. Any other long-running process
(a notebook kernel) starts the same way with
`python -m tljax.cpu_backend.allocator jupyter lab`.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
import warnings
from typing import Mapping

# glibc malloc tunables (read at process start; 64-bit sizes); see `allocator_environ`.
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


TCMALLOC_NAMES = ('tcmalloc_minimal', 'tcmalloc')
MALLOC_CHOICES = ('glibc', 'tcmalloc')


def tcmalloc_library() -> str | None:
  """gperftools' tcmalloc as the system has it (Debian/Ubuntu: libtcmalloc-minimal4), or None."""
  for name in TCMALLOC_NAMES:
    found = ctypes.util.find_library(name)
    if found:
      for folder in ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                     '/usr/lib', '/usr/local/lib'):
        if os.path.exists(os.path.join(folder, found)):
          return os.path.join(folder, found)
      return found
  return None


def malloc_choice(environ: Mapping[str, str] | None = None) -> str:
  """'glibc' (default: tunables and the huge-block cache) or 'tcmalloc' (TLJAX_MALLOC=tcmalloc:
  the system's tcmalloc preloaded instead; same speed, more peak memory, see the module doc)."""
  env = os.environ if environ is None else environ
  value = env.get('TLJAX_MALLOC', 'glibc').strip().lower() or 'glibc'
  if value not in MALLOC_CHOICES:
    raise ValueError(f'TLJAX_MALLOC={value!r}: use glibc (tunables and the huge-block cache, '
                     'the default) or tcmalloc (the system\'s libtcmalloc preloaded).')
  if value == 'tcmalloc' and not tcmalloc_library():
    raise ValueError('TLJAX_MALLOC=tcmalloc but no libtcmalloc was found; install it '
                     '(apt install libtcmalloc-minimal4) or leave TLJAX_MALLOC unset.')
  return value


def process_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """`environ` with the host allocator a CPU training process should start under:
  `allocator_environ`'s glibc settings and cache, or tcmalloc (`malloc_choice`)."""
  env = dict(os.environ if environ is None else environ)
  if malloc_choice(env) == 'glibc':
    return allocator_environ(env)
  library = tcmalloc_library()
  preload = [p for p in env.get('LD_PRELOAD', '').replace(' ', ':').split(':') if p]
  if library not in preload:
    env['LD_PRELOAD'] = ':'.join([library, *preload])
  return env


def _preloaded(library: str, environ: Mapping[str, str]) -> bool:
  return library in environ.get('LD_PRELOAD', '').replace(' ', ':').split(':')


def tcmalloc_active() -> bool:
  """True if this process runs on a preloaded tcmalloc."""
  try:
    with open('/proc/self/maps') as f:
      return any('libtcmalloc' in line for line in f)
  except OSError:
    return False


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
  if ops.requested(env) == 'xla' or not runs_on_cpu(env) or not _is_glibc_linux():
    return None
  library = tcmalloc_library()
  if tunables_active(env) or (library and _preloaded(library, env)):
    return None   # already restarted (or started that way)
  return process_environ(env)


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
  keep = '; --notune_malloc leaves the process as started'
  if tcmalloc_active():
    memory = 'tcmalloc (LD_PRELOAD)' + keep
  elif tunables_active():
    cache = ' + huge-block cache (LD_PRELOAD)' if block_cache_active() else ''
    memory = f'glibc malloc tunables{cache}' + keep
  else:
    memory = 'malloc as started'
  return f'CPU backend: {kernels}; {memory}'


def main(argv: list[str]) -> None:
  """`python -m tljax.cpu_backend.allocator COMMAND...`: COMMAND under `process_environ()`.

  For processes that run many CPU steps without `tljax.main` (a Jupyter
  kernel, a script): glibc reads its tunables only at start-up.
  """
  if not argv:
    sys.exit('usage: python -m tljax.cpu_backend.allocator COMMAND [ARGS...]  '
             '(e.g. jupyter lab, or python train.py)')
  try:
    environ = process_environ()
  except ValueError as e:
    sys.exit(f'error: {e}')
  try:
    os.execvpe(argv[0], argv, environ)
  except OSError as e:
    sys.exit(f'error: cannot run {argv[0]!r}: {e.strerror}')


if __name__ == '__main__':
  main(sys.argv[1:])
