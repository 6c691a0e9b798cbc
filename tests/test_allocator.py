"""The allocator settings keep a step's freed memory in the process, across the 2 GiB mallopt cap."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tljax.cpu_backend import allocator

glibc_only = pytest.mark.skipif(
    platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc tunables')


def test_allocator_environ_adds_tunables_and_keeps_the_users():
  env = allocator.allocator_environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.x=1',
                                       'OTHER': 'y'})
  items = dict(kv.split('=') for kv in env['GLIBC_TUNABLES'].split(':'))
  assert items['glibc.malloc.arena_max'] == '4' and items['glibc.x'] == '1'
  assert int(items['glibc.malloc.mmap_threshold']) > 2 ** 31   # what mallopt cannot set
  assert env['OTHER'] == 'y'
  assert allocator.allocator_environ({})['GLIBC_TUNABLES'].count('glibc.malloc.') == 4


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
  assert faults(allocator.allocator_environ(plain)) < 1_000


_RESTART = textwrap.dedent('''
    import os, sys
    from tljax.cpu_backend import allocator
    print('run', os.getpid(), allocator.tunables_active(), sys.argv[1:], flush=True)
    allocator.restart_with_tuned_allocator()
    print('after', allocator.tunables_active(), flush=True)
''')


@glibc_only
def test_restart_runs_the_same_process_once_with_the_tunables(tmp_path):
  script = tmp_path / 'child.py'
  script.write_text(_RESTART)
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS='cpu', TLJAX_MALLOC='glibc')
  env.pop('GLIBC_TUNABLES', None)
  env.pop('TLJAX_OPS', None)
  out = subprocess.run([sys.executable, str(script), '--flag=1'], env=env, capture_output=True,
                       text=True, check=True).stdout.split('\n')
  first, second, after = out[0].split(), out[1].split(), out[2]
  assert first[0] == second[0] == 'run' and first[1] == second[1]      # same pid: execve
  assert first[2] == 'False' and second[2] == 'True'
  assert out[0].endswith("['--flag=1']") and out[1].endswith("['--flag=1']")
  assert after == 'after True'


# The failure the huge-block cache exists for: a freed block with a live allocation above it,
# then a request that only the hole can serve (8 MiB: no other free chunk is that big), then the
# same big request again. glibc carves the 8 MiB out of the hole, so the big block is placed (and
# faulted in) afresh above it; the cache hands back the same pages.
_HOLE = textwrap.dedent('''
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 300 << 20
    big = libc.malloc(n); ctypes.memset(big, 1, n)
    pin = libc.malloc(4096)
    libc.free(big)
    medium = libc.malloc(8 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = libc.malloc(n); ctypes.memset(again, 2, n)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, again == big)
''')


def _run(script, env, *args):
  out = subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()


@glibc_only
def test_block_cache_reuses_the_block_glibc_places_afresh():
  tuned = allocator.allocator_environ({k: v for k, v in os.environ.items()
                                         if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')})
  assert 'tljax_hostalloc_' in tuned['LD_PRELOAD']
  heap_only = {k: v for k, v in tuned.items() if k != 'LD_PRELOAD'}
  faults, same = _run(_HOLE, heap_only)
  assert int(faults) > 60_000 and same == 'False'        # 300 MiB of fresh 4 KiB pages
  faults, same = _run(_HOLE, tuned)
  assert int(faults) < 1_000 and same == 'True'


_SEMANTICS = textwrap.dedent('''
    import ctypes
    libc = ctypes.CDLL(None)
    P, S = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in [('malloc', P, (S,)), ('calloc', P, (S, S)), ('realloc', P, (P, S)),
                            ('memalign', P, (S, S)), ('aligned_alloc', P, (S, S)),
                            ('malloc_usable_size', S, (P,)), ('free', None, (P,)),
                            ('posix_memalign', ctypes.c_int, (ctypes.POINTER(P), S, S))]:
      fn = getattr(libc, name); fn.restype, fn.argtypes = res, args
    stats = libc.tljax_hostalloc_stats
    def cache():
      mapped, cached = S(), S(); stats(ctypes.byref(mapped), ctypes.byref(cached))
      return mapped.value, cached.value
    MiB = 1 << 20
    def byte(p, i): return ctypes.string_at(p + i, 1)[0]

    a = libc.malloc(100 * MiB); assert a % 4096 == 0
    assert libc.malloc_usable_size(a) >= 100 * MiB
    ctypes.memset(a, 7, 100 * MiB); libc.free(a)
    assert cache() == (100 * MiB, 100 * MiB)
    z = libc.calloc(1, 90 * MiB); assert z == a                 # reused (within 25%) ...
    assert byte(z, 0) == byte(z, 90 * MiB - 1) == byte(z, 45 * MiB) == 0   # ... and zeroed
    assert libc.malloc(70 * MiB) != a                           # in use: a second mapping
    ctypes.memset(z, 3, 90 * MiB)
    g = libc.realloc(z, 300 * MiB); assert byte(g, 0) == byte(g, 90 * MiB - 1) == 3
    s = libc.realloc(g, 1000); assert s % 4096 != 0 and byte(s, 999) == 3   # back to glibc
    libc.free(s)
    h = libc.realloc(libc.malloc(1000), 200 * MiB); assert h % 4096 == 0
    out = P()
    assert libc.posix_memalign(ctypes.byref(out), 64, 80 * MiB) == 0 and out.value % 4096 == 0
    assert libc.posix_memalign(ctypes.byref(out), 3, 80 * MiB) != 0           # EINVAL
    assert libc.aligned_alloc(4096, 80 * MiB) % 4096 == 0
    big_align = libc.memalign(1 << 16, 80 * MiB); assert big_align % (1 << 16) == 0
    libc.free(big_align); libc.free(h)
    small = libc.malloc(1 << 20); assert small and libc.malloc_usable_size(small) >= 1 << 20
    libc.free(small)
    mapped, cached = cache()
    assert cached <= 2 * 300 * MiB and mapped < 2 << 30, (mapped, cached)
    print('ok')
''')


@glibc_only
def test_block_cache_keeps_the_c_allocator_contract():
  env = allocator.allocator_environ({k: v for k, v in os.environ.items()
                                       if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')})
  assert _run(_SEMANTICS, env) == ['ok']


_JAX = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from tljax.cpu_backend import allocator
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)              # temporaries above 64 MiB
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 4096), np.float32))
    results = [np.asarray(f(x)) for _ in range(3)]
    assert all(np.array_equal(results[0], r) for r in results)
    np.save(sys.argv[1], results[0])
    print(allocator.block_cache_active())
''')


@glibc_only
def test_jax_runs_the_same_under_the_block_cache(tmp_path):
  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
  base.update(PYTHONPATH=os.getcwd(), JAX_PLATFORMS='cpu')
  assert _run(_JAX, allocator.allocator_environ(base), str(tmp_path / 'on.npy')) == ['True']
  assert _run(_JAX, base, str(tmp_path / 'off.npy')) == ['False']
  import numpy as np
  np.testing.assert_array_equal(np.load(tmp_path / 'on.npy'), np.load(tmp_path / 'off.npy'))


def test_block_cache_switch():
  env = allocator.allocator_environ({'LD_PRELOAD': '/opt/user.so', 'TLJAX_HOST_BLOCK_CACHE': '0'})
  assert env['LD_PRELOAD'] == '/opt/user.so'
  with pytest.raises(ValueError, match='TLJAX_HOST_BLOCK_CACHE'):
    allocator.allocator_environ({'TLJAX_HOST_BLOCK_CACHE': 'maybe'})
  if allocator._is_glibc_linux():
    env = allocator.allocator_environ({'LD_PRELOAD': '/opt/user.so'})
    first, rest = env['LD_PRELOAD'].split(':')
    assert 'tljax_hostalloc_' in first and rest == '/opt/user.so'
    assert allocator.allocator_environ(env)['LD_PRELOAD'] == env['LD_PRELOAD']
