"""Reads PyTorch `.pth` state dicts without torch and without running pickled code.

A `.pth` file is a pickle, and unpickling can call any importable function
(`os.system`, `builtins.eval`, ...). The unpickler here resolves globals
from a fixed table of inert stand-ins: the tensor-rebuild functions become
functions that only record (storage, offset, shape, strides), storage types
become dtype tags, `collections.OrderedDict` stays itself. Any other global
is refused with an error naming it, before anything is called.

Both on-disk layouts torch has written are supported:
  * zip (torch >= 1.6 default): `<dir>/data.pkl` + `<dir>/data/<key>` raw
    storages + `<dir>/byteorder`;
  * legacy (`_use_new_zipfile_serialization=False`, older releases): magic
    number, protocol version and sys-info pickles, the main pickle, a pickled
    list of storage keys, then each storage as a little-endian int64 element
    count and its raw little-endian bytes.
Tensors are materialised only after all storages are read and every view
is bounds-checked, so a malformed file cannot make numpy read outside a
storage.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from tljax.porting.merge import PortError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype (bfloat16 is decoded separately).
STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}


class _Inert:
  """Base of every object the unpickler can hand out.

  No `__dict__` and a refusing `__setstate__`: a crafted BUILD opcode can
  neither rewire these objects nor poison them for later loads.
  """

  __slots__ = ()

  def __setstate__(self, state):
    raise PortError(f'refusing to set state on {type(self).__name__} (unexpected BUILD opcode)')


class _StorageType(_Inert):
  """Stand-in for `torch.FloatStorage` & co.: only carries the dtype."""

  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == 'bfloat16' else np.dtype(self.dtype).itemsize


class _Marker(_Inert):
  """Stand-in for allowed non-callable globals (e.g. `torch.Tensor` as a type tag)."""

  __slots__ = ('name',)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f'<{self.name}>'


class _SafeCallable(_Inert):
  """One of the rebuild functions below, callable by REDUCE but not modifiable."""

  __slots__ = ('fn',)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


class _Storage(_Inert):
  """A typed storage; `data` (1-D) is filled once its raw bytes are read."""

  __slots__ = ('key', 'stype', 'numel', 'data', 'view_of')

  def __init__(self, key: str, stype: _StorageType, numel: int, view_of=None):
    self.key, self.stype, self.numel = key, stype, numel
    self.data: np.ndarray | None = None
    self.view_of = view_of  # (root storage, element offset) for legacy storage views

  def fill(self, raw: bytes, big_endian: bool, where: str):
    nbytes = self.numel * self.stype.itemsize
    if len(raw) < nbytes:
      raise PortError(f'{where}: storage {self.key} has {len(raw)} bytes, needs {nbytes} '
                      '(file truncated or corrupt)')
    raw = raw[:nbytes]
    if self.stype.dtype == 'bfloat16':
      bits = np.frombuffer(raw, dtype='>u2' if big_endian else '<u2').astype(np.uint32)
      self.data = (bits << 16).view(np.float32)
    else:
      dtype = np.dtype(self.stype.dtype).newbyteorder('>' if big_endian else '<')
      self.data = np.frombuffer(raw, dtype=dtype).astype(np.dtype(self.stype.dtype))

  def resolve(self) -> np.ndarray:
    if self.data is None and self.view_of is not None:
      root, offset = self.view_of
      if root.data is None or offset + self.numel > root.data.size:
        raise PortError(f'storage view {self.key} lies outside its root storage {root.key}')
      self.data = root.data[offset:offset + self.numel]
    if self.data is None:
      raise PortError(f'storage {self.key} was never read (file truncated or corrupt)')
    return self.data


class _LazyTensor(_Inert):
  """What `_rebuild_tensor_v2` returns here: a strided view, resolved after loading."""

  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise PortError(f'tensor rebuilt from {type(storage).__name__}, expected a storage')
    ints = lambda xs: all(isinstance(v, int) and v >= 0 for v in xs)
    if not (isinstance(offset, int) and offset >= 0 and len(size) == len(stride) and ints(size)
            and ints(stride)):
      raise PortError(f'malformed tensor geometry: offset={offset!r} size={size!r} '
                      f'stride={stride!r}')
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def materialize(self) -> np.ndarray:
    data = self.storage.resolve()
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= data.size:
      raise PortError(f'tensor of shape {self.size} at offset {self.offset} reads past the end '
                      f'of storage {self.storage.key} ({data.size} elements)')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size,
        strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_tensor(storage, offset, size, stride):
  return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  if not isinstance(data, _LazyTensor):
    raise PortError(f'parameter rebuilt from {type(data).__name__}, expected a tensor')
  return data


_TENSOR_FNS = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses pickle as (rebuild, type, args, state); only plain tensors pass."""
  if not (isinstance(func, _SafeCallable) and func.fn in _TENSOR_FNS):
    raise PortError(f'_rebuild_from_type_v2 with disallowed function {func!r}')
  if not isinstance(new_type, _Marker):
    raise PortError(f'_rebuild_from_type_v2 with disallowed type {new_type!r}')
  return func(*args)


def _safe_globals() -> dict[tuple[str, str], Any]:
  """Everything a plain state dict needs (a subset of torch's weights_only allowlist).

  Built afresh for every file, so nothing one file does is visible to the next.
  """
  table: dict[tuple[str, str], Any] = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _SafeCallable(_rebuild_tensor_v2),
      ('torch._utils', '_rebuild_tensor'): _SafeCallable(_rebuild_tensor),
      ('torch._utils', '_rebuild_parameter'): _SafeCallable(_rebuild_parameter),
      ('torch._utils', '_rebuild_parameter_with_state'): _SafeCallable(_rebuild_parameter),
      ('torch._tensor', '_rebuild_from_type_v2'): _SafeCallable(_rebuild_from_type_v2),
      ('torch', 'Tensor'): _Marker('torch.Tensor'),
      ('torch._tensor', 'Tensor'): _Marker('torch.Tensor'),
      ('torch.nn.parameter', 'Parameter'): _Marker('torch.nn.Parameter'),
      ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage'),
  }
  table.update({('torch', name): _StorageType(name) for name in STORAGE_DTYPES})
  return table


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals only from `_safe_globals()`; storages via `storage_for`."""

  def __init__(self, file, storage_for, where: str):
    super().__init__(file, encoding='utf-8')
    self._globals = _safe_globals()
    self._storage_for = storage_for
    self._where = where

  def find_class(self, module, name):
    try:
      return self._globals[(module, name)]
    except KeyError:
      raise PortError(
          f'{self._where}: refusing to load global {module}.{name}; only plain tensor state dicts '
          'are allowed (this file may contain a pickled model object or malicious code)') from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] in ('storage', b'storage')):
      raise PortError(f'{self._where}: unsupported persistent id {pid!r:.80}')
    if self._storage_for is None:
      raise PortError(f'{self._where}: unexpected storage reference in a header pickle')
    return self._storage_for(pid[1:])


def _check_storage_args(args, where):
  stype, key, numel = args[0], args[1], args[3]
  if not isinstance(stype, _StorageType):
    raise PortError(f'{where}: storage of unknown type {stype!r}')
  if not isinstance(numel, int) or numel < 0:
    raise PortError(f'{where}: storage {key!r} has invalid size {numel!r}')
  return stype, str(key), numel


def _load_zip(path: str, zf: zipfile.ZipFile):
  names = zf.namelist()
  pkls = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    hint = ' (a TorchScript archive? export a state_dict instead)' if any(
        n.endswith('constants.pkl') for n in names) else ''
    raise PortError(f'{path}: zip file without exactly one <dir>/data.pkl{hint}; not a torch.save '
                    'checkpoint')
  prefix = pkls[0][:-len('data.pkl')]
  big_endian = False
  if prefix + 'byteorder' in names:
    order = zf.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if order not in ('little', 'big'):
      raise PortError(f'{path}: unknown byteorder {order!r}')
    big_endian = order == 'big'
  storages: dict[str, _Storage] = {}

  def storage_for(args):
    if len(args) != 4:
      raise PortError(f'{path}: malformed storage reference {args!r:.80}')
    stype, key, numel = _check_storage_args(args, path)
    if key not in storages:
      entry = f'{prefix}data/{key}'
      if entry not in names:
        raise PortError(f'{path}: storage {entry} is missing from the archive')
      storages[key] = _Storage(key, stype, numel)
      storages[key].fill(zf.read(entry), big_endian, path)
    return storages[key]

  return _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), storage_for, path).load()


def _load_legacy(path: str, f) -> Any:
  size = os.fstat(f.fileno()).st_size
  header = lambda: _RestrictedUnpickler(f, None, path).load()
  if header() != LEGACY_MAGIC:
    raise PortError(f'{path}: bad magic number; not a PyTorch checkpoint')
  protocol = header()
  if protocol != LEGACY_PROTOCOL:
    raise PortError(f'{path}: unsupported legacy protocol version {protocol!r}')
  header()  # sys_info; torch writes legacy storages little-endian on every platform
  storages: dict[str, _Storage] = {}
  views: dict[str, _Storage] = {}

  def storage_for(args):
    if len(args) != 5:
      raise PortError(f'{path}: malformed storage reference {args!r:.80}')
    stype, key, numel = _check_storage_args(args, path)
    root = storages.setdefault(key, _Storage(key, stype, numel))
    if args[4] is None:
      return root
    # Old files reference storage views as (view_key, offset, size) within a root storage.
    view_key, offset, size = args[4]
    if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and size >= 0):
      raise PortError(f'{path}: malformed storage view {args[4]!r:.80}')
    return views.setdefault(str(view_key), _Storage(str(view_key), stype, size, (root, offset)))

  result = _RestrictedUnpickler(f, storage_for, path).load()
  keys = header()
  if not isinstance(keys, list):
    raise PortError(f'{path}: storage key list missing (file truncated or corrupt)')
  for key in keys:
    key = str(key)
    if key not in storages:
      raise PortError(f'{path}: storage {key} listed but never referenced')
    head = f.read(8)
    if len(head) != 8:
      raise PortError(f'{path}: file ends before storage {key} (truncated)')
    (numel,) = struct.unpack('<q', head)
    st = storages[key]
    if numel != st.numel:
      raise PortError(f'{path}: storage {key} has {numel} elements on disk, {st.numel} declared')
    nbytes = numel * st.stype.itemsize
    if nbytes > size - f.tell():
      raise PortError(f'{path}: file ends inside storage {key} (truncated)')
    st.fill(f.read(nbytes), False, path)
  return result


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  if isinstance(obj, _Inert):
    raise PortError(f'checkpoint holds a bare {type(obj).__name__}, expected tensors')
  return obj


def load(path: str | os.PathLike) -> Any:
  """Unpickles a torch checkpoint into plain Python containers of numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  try:
    with open(path, 'rb') as f:
      head = f.read(4)
      f.seek(0)
      if head.startswith(b'PK'):
        with zipfile.ZipFile(f) as zf:
          return _materialize(_load_zip(path, zf))
      if head[:1] == b'\x80':
        return _materialize(_load_legacy(path, f))
  except PortError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
          AttributeError, IndexError, KeyError, struct.error, UnicodeDecodeError, OSError) as e:
    raise PortError(f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
                    f'{type(e).__name__}: {e}') from e
  raise PortError(f'{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle); '
                  'very old tar-format files must be re-saved with a recent torch.save')


def _as_state_dict(obj, path) -> Mapping[str, Any]:
  if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    for wrapper in ('state_dict', 'model', 'model_state_dict'):
      if isinstance(obj.get(wrapper), dict):
        return obj[wrapper]
  if not isinstance(obj, dict):
    raise PortError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  return obj


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{name: array}` of a `.pth` state dict (optionally wrapped as {'state_dict': ...})."""
  sd = _as_state_dict(load(path), os.fspath(path))
  bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, np.ndarray))
  if bad:
    raise PortError(f'{os.fspath(path)}: non-tensor entries in the state dict: {bad[:10]}')
  return {str(k): v for k, v in sd.items()}
