"""SIGTERM: save at a step every host agrees on, then exit with 143.

Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM and wait a
grace period. Before the training loop runs there is nothing new to save, so
the process stops at once with a message; inside the loop a flag is read
after each device call and the loop saves before stopping. With several
processes JAX's preemption service owns SIGTERM and
`reached_preemption_sync_point` names the same step on every host, so no
host is left waiting in a collective for one that already stopped.

A signal is process state, so whether one arrived is kept here, in one
place: a handler's exception can be swallowed (Python runs handlers between
any two bytecodes, finalizers included), the record of the signal cannot.
"""

from __future__ import annotations

import contextlib
import signal
import sys

_received = {'sigterm': False}
EARLY = ('SIGTERM before the first training step: nothing new to save; '
         're-run the same command to resume.')


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written (if there was anything new to save)."""


def _stop_now(signum, frame):
  _received['sigterm'] = True
  raise Preempted(EARLY)


def _unraisable(hook):
  """A `Preempted` raised inside a finalizer or callback is dropped there (the flag has it)."""
  def quiet(unraisable):
    if not isinstance(unraisable.exc_value, Preempted):
      hook(unraisable)
  quiet.tljax = True
  return quiet


def stop_on_sigterm() -> None:
  """From process start until the loop takes over: SIGTERM raises `Preempted` at once."""
  if not getattr(sys.unraisablehook, 'tljax', False):
    sys.unraisablehook = _unraisable(sys.unraisablehook)
  signal.signal(signal.SIGTERM, _stop_now)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})   # blocked across a re-exec


def check_early() -> None:
  """Raises `Preempted` if a SIGTERM arrived whose exception was swallowed on the way."""
  if _received['sigterm']:
    raise Preempted(EARLY)


@contextlib.contextmanager
def held_across_exec():
  """SIGTERM blocked around an `execve`: the mask and a pending signal survive it, and the
  new process delivers the signal once `stop_on_sigterm` has installed its handler."""
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  try:
    check_early()
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class Preemption:
  """Context for one training run; `requested` says whether to save and stop."""

  def __init__(self):
    import jax
    self.in_loop = False
    self._previous = None
    self._multi = jax.process_count() > 1

  @property
  def requested(self) -> bool:
    return _received['sigterm']

  def __enter__(self):
    if not getattr(sys.unraisablehook, 'tljax', False):
      sys.unraisablehook = _unraisable(sys.unraisablehook)
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:   # not the main thread: preemption is the caller's business
        self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame):
    _received['sigterm'] = True
    if not self.in_loop:
      raise Preempted(EARLY)

  def check(self) -> None:
    """Before the loop: stop now if a SIGTERM arrived while its exception could not propagate."""
    if self.requested and not self.in_loop:
      raise Preempted(EARLY)

  def start_loop(self) -> None:
    """The loop is about to run: from now on SIGTERM only sets the flag the loop reads."""
    self.in_loop = True
    if self.requested:
      raise Preempted(EARLY)

  def reached(self, step: int) -> bool:
    """Called once for every step id, in order, on every host."""
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        _received['sigterm'] = True
    return self.requested
