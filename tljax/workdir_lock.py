"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`.

Two training runs writing one workdir interleave checkpoints and metrics and
the second one dies inside orbax; the lock turns that into an immediate error
naming the holder. `flock` belongs to the open file, so the kernel drops it
when the holder exits in any way (`kill -9` included): a lock file left
behind is never stale, and the pid/host/start time written in it are only
read to name the holder in the error.

The lock file is never deleted: unlinking it while another process waits on
the old inode would let two processes hold "the" lock at once.

Multi-host jobs share one workdir: only process 0 should take the lock (pass
`enabled=jax.process_index() == 0`); the other processes would otherwise be
refused by it. Linux NFS clients (v4, or v3 with lockd) map `flock` onto
byte-range locks that the server arbitrates, so it also holds across hosts;
on filesystems without locking the `flock` call fails and so does `acquire`.
The descriptor is close-on-exec, so take the lock after any re-exec of the
process (tljax.main re-executes itself to tune the allocator).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

LOCK_NAME = '.lock'


class WorkdirInUse(RuntimeError):
  """Another process holds the workdir; the message names it and what to do (one line)."""


def _holder(fd: int) -> str:
  try:
    raw = os.pread(fd, 4096, 0).decode('utf-8', 'replace')
    info = json.loads(raw)
    return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
  except (OSError, ValueError, KeyError, TypeError):
    return 'another process (it has not written its pid yet)'


@contextlib.contextmanager
def acquire(workdir: str, *, enabled: bool = True) -> Iterator[str | None]:
  """Holds `<workdir>/.lock` for the duration of the block; yields its path.

  Raises `WorkdirInUse` at once (no waiting) when another process holds it.
  `enabled=False` yields None and locks nothing: for processes other than 0
  of a multi-host job, and for remote (`scheme://`) workdirs, which have no
  `flock`; those are skipped as well.
  """
  if not enabled or '://' in workdir:
    yield None
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirInUse(f'workdir {workdir} is in use by {_holder(fd)}; wait for that run to '
                         'finish or use another --workdir.') from None
    info = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'argv': sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
      yield path
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
