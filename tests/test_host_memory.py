"""The allocator settings keep a step's freed memory in the process, across the 2 GiB mallopt cap."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tljax.ops import host_memory

glibc_only = pytest.mark.skipif(
    platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc tunables')


def test_allocator_environ_adds_tunables_and_keeps_the_users():
  env = host_memory.allocator_environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.x=1',
                                       'OTHER': 'y'})
  items = dict(kv.split('=') for kv in env['GLIBC_TUNABLES'].split(':'))
  assert items['glibc.malloc.arena_max'] == '4' and items['glibc.x'] == '1'
  assert int(items['glibc.malloc.mmap_threshold']) > 2 ** 31   # what mallopt cannot set
  assert env['OTHER'] == 'y'
  assert host_memory.allocator_environ({})['GLIBC_TUNABLES'].count('glibc.malloc.') == 4


# Frees and re-allocates a 2.2 GB block with C malloc (bigger than any int mallopt takes; numpy
# would add its own huge-page advice) and counts the page faults of touching it the second time.
_REUSE = textwrap.dedent('''
    import ctypes, resource
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 2_200_000_000
    block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(n); ctypes.memset(block, 1, n)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


@glibc_only
def test_tunables_keep_a_freed_block_above_2gib_for_reuse():
  def faults(env):
    out = subprocess.run([sys.executable, '-c', _REUSE], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])

  plain = dict(os.environ)
  plain.pop('GLIBC_TUNABLES', None)
  assert faults(plain) > 400_000            # 2.2 GB / 4 KiB pages, zeroed afresh
  assert faults(host_memory.allocator_environ(plain)) < 1_000


_REEXEC = textwrap.dedent('''
    import os, sys
    from tljax.ops import host_memory
    print('run', os.getpid(), host_memory.tunables_active(), sys.argv[1:], flush=True)
    host_memory.reexec_with_tuned_allocator()
    print('after', host_memory.tune_host_allocator(), flush=True)
''')


@glibc_only
def test_reexec_restarts_the_same_process_once_with_the_tunables(tmp_path):
  script = tmp_path / 'child.py'
  script.write_text(_REEXEC)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  env.pop('GLIBC_TUNABLES', None)
  out = subprocess.run([sys.executable, str(script), '--flag=1'], env=env, capture_output=True,
                       text=True, check=True).stdout.split('\n')
  first, second, after = out[0].split(), out[1].split(), out[2]
  assert first[0] == second[0] == 'run' and first[1] == second[1]      # same pid: execve
  assert first[2] == 'False' and second[2] == 'True'
  assert out[0].endswith("['--flag=1']") and out[1].endswith("['--flag=1']")
  assert after == 'after True'
