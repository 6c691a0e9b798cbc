"""One timing rule for every framework in the suite, so their numbers compare.

A measurement is: one first call (compilation for jit/compile paths, kept
as `first_call_s`), `warmup - 1` more untimed calls, then `iters` timed
calls, each ended by the framework's own synchronisation
(`jax.block_until_ready`, `torch.cuda.synchronize`, or nothing for eager
CPU torch, whose ops return when done). The median is the figure reported;
min and all samples are kept so a noisy run can be recognised in the JSON.
"""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any, Callable


# A measurement whose calls are slow (XLA's grouped-conv backward on CPU takes tens of seconds
# per step) is cut to fewer timed calls, never fewer than MIN_ITERS, to stay near this budget.
SECONDS_PER_MEASUREMENT = 60.0
MIN_ITERS = 2


def measure(call: Callable[[], Any], sync: Callable[[Any], Any], *, iters: int,
            warmup: int) -> dict:
  def timed():
    start = time.perf_counter()
    sync(call())
    return time.perf_counter() - start

  first = last = timed()
  for _ in range(max(0, warmup - 1)):
    last = timed()
  iters = max(1, iters)
  if warmup > 1 and last * iters > SECONDS_PER_MEASUREMENT:
    iters = max(min(iters, MIN_ITERS), int(SECONDS_PER_MEASUREMENT / last))
  samples = [timed() for _ in range(iters)]
  return {'median_s': statistics.median(samples), 'min_s': min(samples),
          'samples': [round(s, 6) for s in samples], 'first_call_s': round(first, 3)}


def failure(exc: BaseException) -> dict:
  """What a measurement that could not run records instead of a time ('n/a' in tables)."""
  last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
  where = f' at {last[0].filename.rsplit("/", 1)[-1]}:{last[0].lineno}' if last else ''
  message = str(exc).splitlines()[0][:240] if str(exc) else ''
  return {'error': f'{type(exc).__name__}: {message}{where}'}


def guarded(label: str, fn: Callable[[], dict]) -> dict:
  """Runs one measurement; a failure is recorded and printed, never fatal to the suite."""
  try:
    return fn()
  except Exception as exc:  # noqa: BLE001 — any framework error must not stop the suite.
    result = failure(exc)
    print(f'  {label}: n/a ({result["error"]})', flush=True)
    return result
