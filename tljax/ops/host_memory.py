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

This changes process-wide state, so it is opt-in: entry points that run
many steps (training, benchmarks) call `tune_host_allocator()` once, early.
The same can be had without code through the environment:
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=67108864`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

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


def tune_host_allocator() -> bool:
  """Applies the settings above; True if they are in effect (glibc on Linux), else False.

  Call before the first large allocation (before building models): threads
  that already own an arena keep it. Calling again is harmless.
  """
  if _state['tuned']:
    return True
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
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


def is_tuned() -> bool:
  return _state['tuned']
