"""C++ CPU kernels, compiled on first use and called through XLA's FFI.

Some ops have no formulation that XLA:CPU compiles well (a depthwise
kernel gradient needs one full pass per tap). Their kernels live in
`tljax/cpu_backend/csrc/*.cc`, written against the FFI headers that ship with
jaxlib. The first process that needs them compiles them with the system C++
compiler (`$CXX`, else `c++`, `-O3 -march=native`) into a cache keyed by the
source, compiler, CPU and jaxlib, so a later process only loads the library.

Nothing here is required: with `TLJAX_NATIVE=0`, with no compiler, or when
compiling fails, `library()` returns None (with one warning saying why and
how to fix it) and callers keep their pure-JAX path. GPU/TPU never use these.

`TLJAX_SANITIZE=address,undefined` (any of the two) builds the kernels with
AddressSanitizer / UndefinedBehaviorSanitizer instead, into their own cache
entry: out-of-bounds stores in these kernels corrupt the heap silently and
crash far away, in XLA's allocator. Python is not instrumented, so the
process must start with the runtime preloaded (`make asan` preloads
`$(g++ -print-file-name=libasan.so)` and libstdc++). In this mode a failed
build is an error, not a fallback, so a sanitizer run cannot quietly test the
pure-JAX paths, and the huge-block cache (`csrc/hostalloc.c`, which would
take allocations away from ASan's checked heap) is never built.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings
from typing import Mapping

import jax
from jax import lax
import jaxlib
import numpy as np

SOURCES = ('depthwise.cc', 'conv.cc', 'batchnorm.cc')
HEADERS = ('common.h', 'parallel.h')
TARGETS = ('tljax_depthwise_forward', 'tljax_depthwise_backward', 'tljax_conv_forward',
           'tljax_conv_kernel_grad', 'tljax_batchnorm_sums')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno')
SANITIZERS = ('address', 'undefined')
_CSRC = pathlib.Path(__file__).with_name('csrc')


def switch(environ: Mapping[str, str], name: str, on: str, off: str) -> bool:
  """An on/off environment variable (default on); any other value is an error naming both."""
  value = environ.get(name, '1').strip().lower()
  if value not in ('0', '1', 'false', 'true', 'off', 'on'):
    raise ValueError(f'{name}={value!r}: use 1 ({on}) or 0 ({off}).')
  return value in ('1', 'true', 'on')


def enabled() -> bool:
  return switch(os.environ, 'TLJAX_NATIVE', 'compile and use the C++ CPU kernels',
                'pure-JAX paths only')


def sanitizers(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
  """The sanitizers `TLJAX_SANITIZE` asks for (comma-separated; empty: none)."""
  value = (os.environ if environ is None else environ).get('TLJAX_SANITIZE', '')
  names = tuple(sorted({v.strip().lower() for v in value.split(',') if v.strip()}))
  unknown = set(names) - set(SANITIZERS)
  if unknown:
    raise ValueError(f'TLJAX_SANITIZE={value!r}: use a comma-separated subset of '
                     f'{",".join(SANITIZERS)}, or nothing.')
  return names


def sanitizer_flags(names: tuple[str, ...]) -> list[str]:
  """Compiler flags for `names`: -O1 and frame pointers keep the reports' stacks exact;
  UBSan stops at its first report instead of printing and going on;
  TLJAX_ISOLATE_BUFFERS gives each buffer a kernel touches its own heap block
  (`csrc/common.h`), since XLA packs temporaries where ASan cannot tell them apart."""
  if not names:
    return list(FLAGS)
  flags = [f for f in FLAGS if f != '-O3']
  flags += ['-O1', '-g', '-fno-omit-frame-pointer', f'-fsanitize={",".join(names)}',
            '-DTLJAX_ISOLATE_BUFFERS']
  if 'undefined' in names:
    flags.append('-fno-sanitize-recover=undefined')
  return flags


def _runtime_loaded(name: str) -> bool:
  try:
    with open('/proc/self/maps') as f:
      return any(f'/lib{name}.so' in line for line in f)
  except OSError:
    return False


def cache_dir() -> pathlib.Path:
  root = os.environ.get('TLJAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'tljax')
  return pathlib.Path(root) / 'native'


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_identity() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return ''.join(line for line in f if line.startswith(('flags', 'model name')))[:4096]
  except OSError:
    return os.uname().machine


def _build(cxx: str) -> pathlib.Path:
  names = sanitizers()
  if 'address' in names and not _runtime_loaded('asan'):
    # Loading an ASan library into an uninstrumented process kills it with a terse message.
    raise RuntimeError('TLJAX_SANITIZE=address needs the ASan runtime preloaded: run with '
                       'LD_PRELOAD=$(gcc -print-file-name=libasan.so) (see `make asan`)')
  prefix = 'tljax_cpu_' + '_'.join(names) if names else 'tljax_cpu'
  return _compile(cxx, prefix, [*sanitizer_flags(names), f'-I{jax.ffi.include_dir()}'],
                  SOURCES + HEADERS, SOURCES, key=(_cpu_identity(), jaxlib.__version__))


def _compile(cxx: str, prefix: str, flags: list[str], inputs: tuple[str, ...],
             sources: tuple[str, ...], key: tuple[str, ...] = ()) -> pathlib.Path:
  """Builds csrc/`sources` into a shared library cached under a hash of everything it depends on."""
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  digest = hashlib.sha256()
  for part in (version, ' '.join(flags), *key):
    digest.update(part.encode())
  for name in inputs:
    digest.update((_CSRC / name).read_bytes())
  name = f'{prefix}_{digest.hexdigest()[:16]}.so'
  for folder in (cache_dir(), pathlib.Path(tempfile.gettempdir()) / f'tljax-native-{os.getuid()}'):
    if (folder / name).exists():
      return folder / name
    try:
      folder.mkdir(parents=True, exist_ok=True)
      if os.access(folder, os.W_OK):
        break
    except OSError:
      continue
  else:
    raise RuntimeError(f'no writable folder for the compiled kernels (tried {cache_dir()}); '
                       'set TLJAX_CACHE_DIR to one')
  out = folder / name
  # Build under a temporary name and rename: concurrent processes never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, *flags, *[str(_CSRC / s) for s in sources], '-o', tmp]
  # The compiler need not run under this process's preloads (a sanitizer runtime, say).
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
  os.replace(tmp, out)
  return out


def host_allocator() -> pathlib.Path:
  """The huge-block cache (`csrc/hostalloc.c`) built as a library for LD_PRELOAD.

  Raises RuntimeError (no compiler, the build failed, or a sanitizer run: the cache
  would hand out memory ASan does not track); `allocator` then runs
  without it.
  """
  if sanitizers():
    raise RuntimeError('not used under TLJAX_SANITIZE; set TLJAX_HOST_BLOCK_CACHE=0')
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError('no C compiler found (install gcc or set CXX)')
  return _compile(cxx, 'tljax_hostalloc', ['-x', 'c', '-std=gnu11', '-O2', '-shared', '-fPIC'],
                  ('hostalloc.c',), ('hostalloc.c',))


def library() -> ctypes.CDLL | None:
  """The compiled kernels, registered as XLA:CPU FFI targets; None when unavailable.

  `TLJAX_NATIVE` is read on every call (it is consulted at trace time), the
  build and registration happen once per process.
  """
  return _load() if enabled() else None


@functools.cache
def _load() -> ctypes.CDLL | None:
  strict = bool(sanitizers())   # a sanitizer run must not quietly test the pure-JAX paths
  cxx = _compiler()
  if cxx is None:
    if strict:
      raise RuntimeError('TLJAX_SANITIZE is set but no C++ compiler was found')
    warnings.warn('tljax: no C++ compiler found (install g++ or set CXX); using the slower '
                  'pure-JAX CPU kernels. Set TLJAX_NATIVE=0 to silence this.')
    return None
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
  except (OSError, RuntimeError) as e:
    if strict:
      raise
    warnings.warn(f'tljax: could not build the C++ CPU kernels ({e}); using the slower '
                  'pure-JAX CPU kernels. Set TLJAX_NATIVE=0 to silence this.')
    return None
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  return lib


def available() -> bool:
  return library() is not None


def dispatch(native_fn, fallback_fn, *args):
  """`native_fn(*args)` when run on CPU with the kernels built; `fallback_fn(*args)` otherwise.

  Decided per platform at lowering (`lax.platform_dependent`), so one traced
  function still runs on GPU/TPU.
  """
  if not available():
    return fallback_fn(*args)
  return lax.platform_dependent(*args, cpu=native_fn, default=fallback_fn)


def call(target: str, results, *args, **attrs):
  """Calls one of the C++ kernels; integer attributes go to it as int64, floats as float32.

  Under `jax.vmap` (a pmap emulated with vmap, per-example gradients) the
  kernel runs once per mapped element.
  """
  return jax.ffi.ffi_call(target, results, vmap_method='sequential')(
      *args, **{k: np.float32(v) if isinstance(v, float) else np.int64(v)
                for k, v in attrs.items()})
