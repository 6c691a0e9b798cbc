"""Plain (non-editable) installs work from what they ship and what they pull in.

`test_wheel_install_builds_and_uses_the_cpu_backend`: the wheel is built
from a copy of the tracked files, installed into a fresh folder, and
imported from there (not from this checkout): the C++ kernels and the
allocator shim must compile from the installed package files, and a
depthwise convolution must run through them.

`test_base_install_has_no_tensorflow_and_trains`: `pip install .` (no
extras) into a fresh venv from the package registry must leave TensorFlow
out, and still import tljax, port a torchvision file to the reference
logits, stream a folder and train the tiny config. It takes minutes
(downloads, a fresh C++ build), so `make test` skips it and CI runs it as
`make install-check` (TLJAX_INSTALL_CHECK=1).
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


BASE_PROBE = '''
import os, sys
import numpy as np
import jax
import tljax
from tljax import models
from tljax.data.streaming import folder_stream
from tljax.data.tfds_source import TfdsSource
from tljax.porting import from_torchvision
import reference_weights

venv, src = sys.argv[1], sys.argv[2]
assert tljax.__file__.startswith(venv), tljax.__file__
fixtures = os.path.join(src, 'tests', 'fixtures')
fixture = reference_weights.load_fixture(os.path.join(fixtures, 'torchvision', 'resnet_tiny.json'))
variables = from_torchvision(os.path.join(fixtures, 'torch_pickles', 'resnet_tiny_zip.pth'),
                             'resnet_tiny', num_classes=10)
case, ref = fixture['inputs'][1], np.asarray(fixture['logits'][1])
y = np.asarray(models.create('resnet_tiny', 10).apply(
    variables, reference_weights.random_inputs(case['seed'], case['shape'])))
err = float(np.abs(y - ref).max())
assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), err

from PIL import Image
paths = []
for i in range(5):
  paths.append(os.path.join(os.getcwd(), f'{i}.png'))
  Image.new('RGB', (9, 7), (i, 2 * i, 3)).save(paths[-1])
split = folder_stream(paths, np.arange(5) % 2, ['a', 'b'], load_size=8, geometry='shorter',
                      name='train', threads=2)
got = [im[:, 0, 0, 0].tolist()
       for im, _ in split.batches(2, shuffle_seed=None, drop_remainder=False)]
assert got == [[0, 1], [2, 3], [4]], got

try:
  TfdsSource('mnist', '')
except ImportError as e:
  assert "pip install 'tljax[tfds]'" in str(e) and '\\n' not in str(e), str(e)
else:
  raise AssertionError('the tfds source opened without tensorflow-datasets')
assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]
print('ok', err)
'''


def _copy_tracked(dest) -> list[str]:
  """The tracked files only: an install must not depend on what lies around the checkout."""
  files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  for name in files:
    if os.path.isfile(os.path.join(ROOT, name)):
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), dest / name)
  return files


@pytest.mark.slow
def test_wheel_install_builds_and_uses_the_cpu_backend(tmp_path):
  if shutil.which('c++') is None and shutil.which('g++') is None:
    pytest.skip('no C++ compiler')
  src = tmp_path / 'src'
  files = _copy_tracked(src)
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


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TLJAX_INSTALL_CHECK') != '1',
                    reason='minutes of downloads and builds: run by `make install-check` (CI)')
def test_base_install_has_no_tensorflow_and_trains(tmp_path):
  src, venv = tmp_path / 'src', tmp_path / 'venv'
  _copy_tracked(src)
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  out = subprocess.run([py, '-m', 'pip', 'install', '-q', str(src)], capture_output=True,
                       text=True, timeout=1800)
  assert out.returncode == 0, out.stdout + out.stderr
  listed = subprocess.run([py, '-m', 'pip', 'list', '--format=freeze'], capture_output=True,
                          text=True, check=True).stdout.lower().split()
  assert not [p for p in listed if p.startswith(('tensorflow', 'tf-', 'tf_'))], listed
  for module in ('tensorflow', 'tensorflow_datasets'):
    out = subprocess.run([py, '-c', f'import {module}'], capture_output=True, text=True)
    assert out.returncode != 0 and 'ModuleNotFoundError' in out.stderr, out.stderr

  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TLJAX_', 'XLA_FLAGS', 'PYTHONPATH'))}
  env.update(PYTHONPATH=str(src / 'tests'), TLJAX_CACHE_DIR=str(tmp_path / 'cache'))
  work = tmp_path / 'work'
  work.mkdir()
  out = subprocess.run([py, '-c', BASE_PROBE, str(venv), str(src)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0 and 'ok' in out.stdout, out.stdout + out.stderr

  env.pop('PYTHONPATH')
  run = tmp_path / 'run'
  out = subprocess.run([py, '-m', 'tljax.main', f'--config={src}/configs/default.py:tiny',
                        f'--workdir={run}'], cwd=work, env=env, capture_output=True, text=True,
                       timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert (run / 'summary.json').is_file() and (run / 'export').is_dir()
