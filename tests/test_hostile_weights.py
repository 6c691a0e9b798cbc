"""Hostile weight files: each is refused with one line, before it can read or allocate much.

Every file is built here: `.h5` files with h5py (a complete Keras MobileNet
V1 at alpha 0.25 with one dataset swapped for the hostile one), `.pth`
files as zip + pickle written opcode by opcode (no torch). Memory bombs run
in a child process whose address space is capped at 1 GiB above what the
imports use, so a reader that allocates what the file asks for dies there
instead of hurting the machine.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
import zlib

import h5py
import numpy as np
import pytest

from tljax.porting import efficientnet_lite, from_keras, from_torchvision, pickle_reader
from tljax.porting import keras as kp
from tljax.porting import weights_io
from tljax.porting.merge import PortError, flatten

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_PTH = os.path.join(HERE, 'fixtures', 'torch_pickles', 'resnet_tiny_zip.pth')
ALPHA = 0.25
GIB = 1 << 30


def refusal(excinfo, *needles) -> str:
  msg = str(excinfo.value)
  assert '\n' not in msg, msg
  for needle in needles:
    assert needle in msg, msg
  return msg


def run_capped(call: str, timeout: int = 300) -> str:
  """Runs `call` in a child capped at 1 GiB of address space beyond the imports; its verdict."""
  script = textwrap.dedent('''
      import resource
      from tljax.porting import keras, pickle_reader
      from tljax.porting.merge import PortError
      keras._model_shapes('mobilenet_v1', 1000, (('alpha', 0.25),))
      vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status')
                if l.startswith('VmSize'))
      hard = resource.getrlimit(resource.RLIMIT_AS)[1]
      resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
      try:
        {call}
      except PortError as e:
        print('refused:', e)
      else:
        print('accepted')
      ''').format(call=call)
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, f'rc={proc.returncode}\n{proc.stderr[-3000:]}'
  return proc.stdout.strip()


# ---------------------------------------------------------------- .h5 files

def _keras_value(shapes, layer, role, rng) -> np.ndarray:
  """The array Keras stores for `role` of `layer`, from the Flax model's shapes."""
  if role in ('kernel', 'bias'):
    shape = shapes[f'params/{layer.path}/{role}']
    if role == 'kernel' and layer.kind == 'dwconv':
      shape = shape[:2] + (shape[3], 1)
    elif role == 'kernel' and layer.kind == 'conv_dense':
      shape = (1, 1) + shape
  else:
    shape = shapes[f'params/{layer.path}/scale']
  value = rng.standard_normal(shape).astype(np.float32) * 0.1
  return np.abs(value) + 0.5 if role in ('gamma', 'moving_variance') else value


def mobilenet_h5(path, target=None, make=None) -> str:
  """A legacy-layout Keras MobileNet V1 (alpha 0.25) file; `make(group, name, data)` writes the
  dataset `target` = (layer, role) instead of a plain `create_dataset`."""
  shapes = kp._model_shapes('mobilenet_v1', 1000, (('alpha', ALPHA),))[1]
  rng = np.random.default_rng(0)
  layers = kp.keras_layers('mobilenet_v1', ALPHA)
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = np.array([l.names[0].encode() for l in layers])
    for layer in layers:
      name = layer.names[0]
      group = f.create_group(name)
      roles = kp._ROLES[layer.kind]
      group.attrs['weight_names'] = np.array([f'{name}/{r}:0'.encode() for r in roles])
      for role in roles:
        data = _keras_value(shapes, layer, role, rng)
        if (name, role) == target:
          make(group, f'{name}/{role}:0', data)
        else:
          group.create_dataset(f'{name}/{role}:0', data=data)
  return str(path)


GAMMA = ('conv1_bn', 'gamma')   # 8 float32 values at alpha 0.25
GAMMA_PATH = '/conv1_bn/conv1_bn/gamma:0'


def test_clean_file_ports(tmp_path):
  variables = from_keras(mobilenet_h5(tmp_path / 'ok.h5'), 'mobilenet_v1', alpha=ALPHA)
  assert variables['params']['backbone']['conv1_bn']['scale'].shape == (8,)


def test_external_raw_storage_never_pulls_in_a_local_file(tmp_path):
  secret = tmp_path / 'secret.txt'
  secret.write_bytes(b'password=hunter2' * 2)
  path = mobilenet_h5(tmp_path / 'evil.h5', GAMMA, lambda g, name, data: g.create_dataset(
      name, shape=data.shape, dtype='f4', external=[(str(secret), 0, 32)]))
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, path, GAMMA_PATH, 'external storage')


def _external_link(tmp_path):
  other = tmp_path / 'elsewhere.h5'
  with h5py.File(other, 'w') as f:
    f.create_dataset('secret', data=np.full(8, 7.0, np.float32))
  return lambda g, name, data: g.__setitem__(name, h5py.ExternalLink(str(other), '/secret'))


@pytest.mark.parametrize('kind,needle', [
    ('external_link', 'external link'),
    ('dangling_soft_link', 'does not resolve inside the file'),
    ('soft_link_to_external_link', 'external link'),
])
def test_links_out_of_the_file_are_refused(tmp_path, kind, needle):
  if kind == 'external_link':
    make = _external_link(tmp_path)
  elif kind == 'dangling_soft_link':
    make = lambda g, name, data: g.__setitem__(name, h5py.SoftLink('/nowhere/gamma'))
  else:
    ext = _external_link(tmp_path)

    def make(g, name, data):
      ext(g.file, 'hop', data)
      g[name] = h5py.SoftLink('/hop')
  path = mobilenet_h5(tmp_path / 'evil.h5', GAMMA, make)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, path, needle)
  # A soft link that stays inside the file is plain HDF5 and still ports.
  inside = mobilenet_h5(tmp_path / 'ok.h5', GAMMA, lambda g, name, data: (
      g.file.create_dataset('real_gamma', data=data), g.__setitem__(name, h5py.SoftLink(
          '/real_gamma'))))
  variables = from_keras(inside, 'mobilenet_v1', alpha=ALPHA)
  with h5py.File(inside) as f:
    np.testing.assert_array_equal(variables['params']['backbone']['conv1_bn']['scale'],
                                  f['real_gamma'][()])


def test_virtual_dataset_is_refused(tmp_path):
  other = tmp_path / 'source.h5'
  with h5py.File(other, 'w') as f:
    f.create_dataset('x', data=np.ones(8, np.float32))

  def make(g, name, data):
    layout = h5py.VirtualLayout(shape=(8,), dtype='f4')
    layout[:] = h5py.VirtualSource(str(other), 'x', shape=(8,))
    g.create_virtual_dataset(name, layout)
  path = mobilenet_h5(tmp_path / 'evil.h5', GAMMA, make)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, path, GAMMA_PATH, 'virtual dataset')


@pytest.mark.parametrize('kw,needle', [({'compression': 'lzf'}, 'lzf'),
                                       ({'scaleoffset': 2}, 'scaleoffset')])
def test_filters_keras_never_writes_are_refused(tmp_path, kw, needle):
  make = lambda g, name, data: g.create_dataset(name, data=data, **kw)
  path = mobilenet_h5(tmp_path / 'odd.h5', GAMMA, make)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, path, GAMMA_PATH, needle)
  # gzip, shuffle and fletcher32 (h5repack's usual set) are read.
  make = lambda g, name, data: g.create_dataset(name, data=data, compression='gzip', shuffle=True,
                                                fletcher32=True)
  variables = from_keras(mobilenet_h5(tmp_path / 'ok.h5', GAMMA, make), 'mobilenet_v1',
                         alpha=ALPHA)
  plain = from_keras(mobilenet_h5(tmp_path / 'plain.h5'), 'mobilenet_v1', alpha=ALPHA)
  for k, v in flatten(plain).items():
    np.testing.assert_array_equal(flatten(variables)[k], v, err_msg=k)


@pytest.mark.parametrize('dtype', ['i4', [('a', 'f4'), ('b', 'f4')], h5py.string_dtype()])
def test_non_float_datasets_are_refused_before_reading(tmp_path, dtype):
  def make(g, name, data):
    g.create_dataset(name, shape=data.shape, dtype=dtype)
  path = mobilenet_h5(tmp_path / 'odd.h5', GAMMA, make)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, path, GAMMA_PATH, 'dtype')


def test_truncated_and_non_hdf5_files_give_one_line(tmp_path):
  good = mobilenet_h5(tmp_path / 'good.h5')
  data = open(good, 'rb').read()
  truncated = tmp_path / 'truncated.h5'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(PortError) as e:
    from_keras(str(truncated), 'mobilenet_v1', alpha=ALPHA)
  refusal(e, str(truncated), 'truncated', 'download it again')
  for name, content in (('notes.h5', b'hello, not hdf5\n' * 100), ('model.h5', open(TINY_PTH,
                                                                                   'rb').read())):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PortError) as e:
      from_keras(str(path), 'mobilenet_v1', alpha=ALPHA)
    refusal(e, str(path), 'not an HDF5 file')
  with pytest.raises(PortError) as e:
    from_keras(str(tmp_path / 'missing.h5'), 'mobilenet_v1', alpha=ALPHA)
  refusal(e, 'no such file')


def _gzip_bomb(nbytes: int) -> bytes:
  """A zlib stream of `nbytes` zeros, built from one repeated fully-flushed block (fast)."""
  block = 1 << 24
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  body = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
  tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
  adler = 1
  for _ in range(nbytes // block):
    adler = zlib.adler32(bytes(block), adler)
  return b'\x78\xda' + body * (nbytes // block) + tail + adler.to_bytes(4, 'big')


def test_gzip_chunk_bomb_is_refused_before_inflating(tmp_path):
  bomb = _gzip_bomb(GIB)
  assert len(bomb) < 2 << 20   # a 1 MiB chunk (256x1000 float32) may plausibly store this much

  def make(g, name, data):
    d = g.create_dataset(name, shape=data.shape, dtype='f4', chunks=data.shape,
                         compression='gzip')
    d.id.write_direct_chunk((0, 0, 0, 0), bomb)
  path = mobilenet_h5(tmp_path / 'bomb.h5', ('conv_preds', 'kernel'), make)
  out = run_capped(f'keras.from_keras({path!r}, "mobilenet_v1", alpha=0.25)')
  assert out.startswith('refused:') and '\n' not in out, out
  assert '/conv_preds/conv_preds/kernel:0' in out and 'inflates' in out


def test_unwritten_huge_dataset_is_refused_by_shape_before_reading(tmp_path):
  def make(g, name, data):
    g.create_dataset(name, shape=(20000, 20000), dtype='f4', chunks=(1000, 1000))
  path = mobilenet_h5(tmp_path / 'huge.h5', ('conv1', 'kernel'), make)
  assert os.path.getsize(path) < 4 << 20   # the whole model is 2 MB; the 1.5 GiB costs nothing
  out = run_capped(f'keras.from_keras({path!r}, "mobilenet_v1", alpha=0.25)')
  assert out.startswith('refused:') and 'file (20000, 20000) vs model (3, 3, 3, 8)' in out, out


# ---------------------------------------------------------------- .pth files, written by hand

def _global(module, name):
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode()


def _tuple(*items):
  return pickle.MARK + b''.join(items) + pickle.TUPLE


def _int(v):
  if -2 ** 31 <= v < 2 ** 31:
    return pickle.BININT + int(v).to_bytes(4, 'little', signed=True)
  raw = int(v).to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
  return pickle.LONG1 + bytes([len(raw)]) + raw


def _str(s):
  return pickle.BINUNICODE + len(s.encode()).to_bytes(4, 'little') + s.encode()


def _storage(key, numel):
  """A FloatStorage persistent id, memoised at slot 0 (torch memoises every object)."""
  return (_tuple(_str('storage'), _global('torch', 'FloatStorage'), _str(key), _str('cpu'),
                 _int(numel)) + pickle.BINPERSID + pickle.BINPUT + b'\x00')


def _tensor(storage, offset, size, stride):
  args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                pickle.NEWFALSE, _global('collections', 'OrderedDict') + pickle.EMPTY_TUPLE
                + pickle.REDUCE)
  return _global('torch._utils', '_rebuild_tensor_v2') + args + pickle.REDUCE


def _state_dict(items) -> bytes:
  body = b''.join(_str(k) + v for k, v in items)
  return (pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS
          + pickle.STOP)


def write_pth(path, data_pkl: bytes, storages: dict[str, bytes]) -> str:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', data_pkl)
    zf.writestr('archive/byteorder', 'little')
    for key, raw in storages.items():
      zf.writestr(f'archive/data/{key}', raw)
  return str(path)


def _deflated_zeros_entry(path, name: str, nbytes: int, data_pkl: bytes | None = None) -> str:
  """A zip whose entry `name` inflates to `nbytes` zeros (compressed ~1000x)."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    if data_pkl is not None:
      zf.writestr('archive/data.pkl', data_pkl)
    with zf.open(name, 'w', force_zip64=True) as f:
      for _ in range(nbytes >> 24):
        f.write(bytes(1 << 24))
  return str(path)


def test_storage_bytes_beyond_the_declared_size_are_refused_not_dropped(tmp_path):
  pkl = _state_dict([('w', _tensor(_storage('0', 4), 0, (4,), (1,)))])
  path = write_pth(tmp_path / 'long.pth', pkl, {'0': np.arange(5, dtype='<f4').tobytes()})
  with pytest.raises(PortError) as e:
    pickle_reader.load_state_dict(path)
  refusal(e, path, 'archive/data/0', '20 bytes', '16')


def test_storage_that_inflates_to_a_gib_is_refused_while_inflating(tmp_path):
  pkl = _state_dict([('w', _tensor(_storage('0', 4), 0, (4,), (1,)))])
  path = _deflated_zeros_entry(tmp_path / 'bomb.pth', 'archive/data/0', GIB, pkl)
  assert os.path.getsize(path) < 8 << 20
  out = run_capped(f'pickle_reader.load_state_dict({path!r})')
  assert out.startswith('refused:') and '\n' not in out and 'archive/data/0' in out, out


def test_data_pkl_that_inflates_to_a_gib_is_refused(tmp_path):
  path = _deflated_zeros_entry(tmp_path / 'bomb.pth', 'archive/data.pkl', GIB)
  out = run_capped(f'pickle_reader.load_state_dict({path!r})')
  assert out.startswith('refused:') and 'archive/data.pkl' in out, out


def test_zero_stride_view_cannot_inflate_a_storage(tmp_path):
  pkl = _state_dict([('w', _tensor(_storage('0', 1), 0, (20000, 20000), (0, 0)))])
  path = write_pth(tmp_path / 'inflate.pth', pkl, {'0': np.ones(1, '<f4').tobytes()})
  assert os.path.getsize(path) < 1024
  out = run_capped(f'pickle_reader.load_state_dict({path!r})')
  assert out.startswith('refused:') and 'stride 0' in out and "'w'" in out, out


@pytest.mark.parametrize('size,stride,needle', [
    ((10 ** 6, 10 ** 6), (0, 0), 'stride 0'),
    ((10 ** 6, 10 ** 6), (1, 1), '1000000000000 elements'),
    ((4, 4), (1, 1), '16 elements'),           # overlapping rows: more elements than stored
    ((2 ** 40, 0, 2 ** 40), (1, 1, 1), 'dimension'),
])
def test_views_larger_than_their_storage_are_refused(tmp_path, size, stride, needle):
  pkl = _state_dict([('w', _tensor(_storage('0', 12), 0, size, stride))])
  path = write_pth(tmp_path / 'view.pth', pkl, {'0': np.arange(12, dtype='<f4').tobytes()})
  with pytest.raises(PortError) as e:
    pickle_reader.load_state_dict(path)
  refusal(e, path, "'w'", needle)


def test_tensors_aliasing_one_storage_cannot_multiply_it(tmp_path):
  numel = 1 << 20   # 4 MiB, re-read by 2000 tensors: 8 GiB if each were copied
  first = _tensor(_storage('0', numel), 0, (numel,), (1,))
  again = _tensor(pickle.BINGET + b'\x00', 0, (numel,), (1,))
  pkl = _state_dict([('w0', first)] + [(f'w{i}', again) for i in range(1, 2000)])
  path = write_pth(tmp_path / 'alias.pth', pkl, {'0': np.zeros(numel, '<f4').tobytes()})
  out = run_capped(f'pickle_reader.load_state_dict({path!r})')
  assert out.startswith('refused:') and 'storage 0' in out, out


def test_deeply_nested_lists_are_refused(tmp_path):
  n = 100_000
  pkl = pickle.PROTO + b'\x02' + pickle.MARK * n + pickle.EMPTY_LIST + pickle.LIST * n + pickle.STOP
  path = write_pth(tmp_path / 'deep.pth', pkl, {})
  with pytest.raises(PortError) as e:
    pickle_reader.load(path)
  refusal(e, path, 'nest')


def test_deeply_nested_tuple_key_is_refused_before_hashing(tmp_path):
  # Hashing a million-deep tuple overflows the C stack: the unpickler itself would crash.
  n = 1_000_000
  pkl = (pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + pickle.MARK * n + pickle.EMPTY_TUPLE
         + pickle.TUPLE * n + pickle.NONE + pickle.SETITEM + pickle.STOP)
  path = write_pth(tmp_path / 'deep.pth', pkl, {})
  out = run_capped(f'pickle_reader.load({path!r})')
  assert out.startswith('refused:') and 'nest' in out, out


def test_tuple_key_sharing_itself_exponentially_is_refused(tmp_path):
  # t0 = (); t(i+1) = (t(i), t(i)): 60 levels, ~500 bytes, and hashing it visits 2**60 tuples.
  body = pickle.EMPTY_TUPLE + pickle.BINPUT + b'\x00' + pickle.POP
  for i in range(60):
    body += (pickle.BINGET + bytes([i]) + pickle.DUP + pickle.TUPLE2 + pickle.BINPUT
             + bytes([i + 1]) + pickle.POP)
  pkl = (pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + body + pickle.BINGET + bytes([60])
         + pickle.NONE + pickle.SETITEM + pickle.STOP)
  path = write_pth(tmp_path / 'wide.pth', pkl, {})
  out = run_capped(f'pickle_reader.load({path!r})', timeout=60)
  assert out.startswith('refused:') and 'expands to' in out, out


# ---------------------------------------------------------------- non-finite weights

def _nan_gamma(g, name, data):
  data = data.copy()
  data[[1, 5]] = [np.nan, np.inf]
  g.create_dataset(name, data=data)


def test_non_finite_keras_weights_need_an_explicit_opt_in(tmp_path):
  path = mobilenet_h5(tmp_path / 'nan.h5', GAMMA, _nan_gamma)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=ALPHA)
  refusal(e, 'params/backbone/conv1_bn/scale', '2 non-finite', 'allow_nonfinite')
  variables = from_keras(path, 'mobilenet_v1', alpha=ALPHA, allow_nonfinite=True)
  assert np.isnan(variables['params']['backbone']['conv1_bn']['scale'][1])


def _tiny_with_nan(tmp_path) -> str:
  """The real torch.save'd resnet_tiny with one NaN written into its first storage."""
  path = tmp_path / 'nan.pth'
  with zipfile.ZipFile(TINY_PTH) as src, zipfile.ZipFile(path, 'w') as dst:
    storages = sorted(n for n in src.namelist() if '/data/' in n)
    for info in src.infolist():
      raw = src.read(info)
      if info.filename == storages[0]:
        raw = np.float32(np.nan).tobytes() + raw[4:]
      dst.writestr(info, raw)
  return str(path)


def test_non_finite_torch_weights_need_an_explicit_opt_in(tmp_path):
  path = _tiny_with_nan(tmp_path)
  with pytest.raises(PortError) as e:
    from_torchvision(path, 'resnet_tiny', 10)
  refusal(e, path, '1 non-finite', 'allow_nonfinite')
  variables = from_torchvision(path, 'resnet_tiny', 10, allow_nonfinite=True)
  assert sum(np.isnan(v).sum() for v in flatten(variables).values()) == 1


def test_non_finite_efficientnet_weights_need_an_explicit_opt_in():
  sd = pickle_reader.load_state_dict(efficientnet_lite.shipped_weights_path())
  sd['_fc.bias'] = sd['_fc.bias'].copy()
  sd['_fc.bias'][:3] = -np.inf
  with pytest.raises(PortError) as e:
    efficientnet_lite.from_efficientnet_lite(sd)
  refusal(e, 'params/head/logits/bias', '3 non-finite')
  variables = efficientnet_lite.from_efficientnet_lite(sd, allow_nonfinite=True)
  assert np.isinf(variables['params']['head']['logits']['bias'][:3]).all()


def test_tampered_weights_directory_with_nan_is_refused_on_load(tmp_path):
  variables = {'params': {'head': {'logits': {'kernel': np.ones((4, 3), np.float32)}}}}
  meta = {'arch': 'x', 'source': 'keras', 'num_classes': 3, 'preprocessing': {}}
  weights_io.save_weights(str(tmp_path), variables, meta)
  path = tmp_path / weights_io.WEIGHTS_FILE
  data = bytearray(path.read_bytes())
  data[-4:] = np.float32(np.nan).tobytes()   # the last value of the only tensor
  path.write_bytes(bytes(data))
  with pytest.raises(PortError) as e:
    weights_io.load_weights(str(tmp_path))
  refusal(e, str(path), 'params/head/logits/kernel', '1 non-finite', 'allow_nonfinite')
  loaded, _ = weights_io.load_weights(str(tmp_path), allow_nonfinite=True)
  assert np.isnan(loaded['params']['head']['logits']['kernel'][-1, -1])


# ---------------------------------------------------------------- the command line

def run_cli(*args):
  proc = subprocess.run([sys.executable, '-m', 'tljax.port', *args], capture_output=True,
                        text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert 'Traceback' not in proc.stderr, proc.stderr
  # absl's own log lines (e.g. "no published checksum") start with a level letter and a date.
  errors = [l for l in proc.stderr.splitlines() if not (l[:1] in 'IWEF' and l[1:5].isdigit())]
  return proc.returncode, errors


def test_cli_refuses_keras_external_storage_with_one_line(tmp_path):
  secret = tmp_path / 'secret.txt'
  secret.write_bytes(b'S' * 32)
  path = mobilenet_h5(tmp_path / 'evil.h5', GAMMA, lambda g, name, data: g.create_dataset(
      name, shape=data.shape, dtype='f4', external=[(str(secret), 0, 32)]))
  out = tmp_path / 'out'
  rc, errors = run_cli('--source=keras', '--arch=mobilenet_v1', '--variant=alpha0.25',
                       f'--input={path}', f'--output={out}')
  assert rc == 1 and len(errors) == 1, errors
  assert errors[0].startswith('error: ') and GAMMA_PATH in errors[0]
  assert not out.exists()


def test_cli_refuses_a_pth_view_bomb_with_one_line(tmp_path):
  pkl = _state_dict([('conv1.weight', _tensor(_storage('0', 1), 0, (10 ** 6, 10 ** 6), (0, 0)))])
  path = write_pth(tmp_path / 'resnet18-f37072fd.pth', pkl, {'0': np.ones(1, '<f4').tobytes()})
  rc, errors = run_cli('--source=torchvision', '--arch=resnet18', f'--input={path}',
                       f'--output={tmp_path / "out"}', '--noverify')
  assert rc == 1 and len(errors) == 1 and errors[0].startswith('error: '), errors
  assert 'conv1.weight' in errors[0]


def test_cli_non_finite_weights_need_allow_nonfinite(tmp_path):
  path = mobilenet_h5(tmp_path / 'nan.h5', GAMMA, _nan_gamma)
  args = ['--source=keras', '--arch=mobilenet_v1', '--variant=alpha0.25', f'--input={path}',
          f'--output={tmp_path / "out"}']
  rc, errors = run_cli(*args)
  assert rc == 1 and len(errors) == 1 and '--allow_nonfinite' in errors[0], errors
  assert not (tmp_path / 'out').exists()
  rc, errors = run_cli(*args, '--allow_nonfinite')
  assert rc == 0, errors
  with pytest.raises(PortError, match='2 non-finite'):
    weights_io.load_weights(str(tmp_path / 'out'))
  variables, _ = weights_io.load_weights(str(tmp_path / 'out'), allow_nonfinite=True)
  assert np.isnan(variables['params']['backbone']['conv1_bn']['scale'][1])
