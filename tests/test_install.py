"""A plain (non-editable) install ships everything the CPU backend builds at run time.

The wheel is built from a copy of the tracked files, installed into a fresh
folder, and imported from there (not from this checkout): the C++ kernels and
the allocator shim must compile from the installed package files, and a
depthwise convolution must run through them.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = '''
import os, sys
import numpy as np
import jax, jax.numpy as jnp
import tljax
from tljax import ops
from tljax.cpu_backend import native
assert tljax.__file__.startswith(sys.argv[1]), tljax.__file__
assert native.__file__.startswith(sys.argv[1]), native.__file__
assert ops.active_backend() == 'cpu', ops.active_backend()
assert native.library() is not None, 'the C++ kernels did not build from the installed sources'
assert native.host_allocator().exists()
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 8)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, 8)), jnp.float32)
y = jax.jit(lambda x, k: ops.conv2d(x, k, strides=1, padding=((1, 1), (1, 1)), groups=8))(x, k)
ref = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), feature_group_count=8,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
assert 'tljax_depthwise' in jax.jit(lambda x, k: ops.conv2d(
    x, k, strides=1, padding=((1, 1), (1, 1)), groups=8)).lower(x, k).as_text()
print('ok', tljax.__file__)
'''


@pytest.mark.slow
def test_wheel_install_builds_and_uses_the_cpu_backend(tmp_path):
  if shutil.which('c++') is None and shutil.which('g++') is None:
    pytest.skip('no C++ compiler')
  src = tmp_path / 'src'
  files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  for name in files:
    if os.path.isfile(os.path.join(ROOT, name)):
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), src / name)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                  '-w', str(tmp_path / 'dist'), str(src)], check=True, capture_output=True)
  wheel, = (tmp_path / 'dist').glob('tljax-*.whl')
  shipped = set(zipfile.ZipFile(wheel).namelist())
  sources = [n for n in files if n.startswith('tljax/cpu_backend/csrc/')]
  assert 'tljax/cpu_backend/csrc/hostalloc.c' in sources and len(sources) >= 6, sources
  assert not set(sources) - shipped, f'C++ sources missing from the wheel: {set(sources) - shipped}'
  assert 'tljax/ops.py' in shipped
  assert not any(n.startswith('tljax/ops/') for n in shipped), 'the old tljax/ops package ships'
  target = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                  str(target), str(wheel)], check=True, capture_output=True)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TLJAX_', 'XLA_FLAGS'))}
  env.update(PYTHONPATH=str(target), TLJAX_CACHE_DIR=str(tmp_path / 'cache'))
  out = subprocess.run([sys.executable, '-c', PROBE, str(target)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'ok' in out.stdout
