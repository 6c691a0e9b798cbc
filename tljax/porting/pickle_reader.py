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

A crafted file must not be able to cost more memory than the weights it
really holds, so every size it declares is checked before it is trusted:
the pickle's nesting depth (scanned opcode by opcode before unpickling: the
unpickler hashes tuple keys recursively, and a million-deep one crashes the
interpreter), each zip member against the size its pickle declares (never
more than that is inflated), each view's shape, strides and offset against
its storage, and all views together against all storages (aliasing views
copied out one by one would multiply the file). Every refusal is one line
naming the file, the entry and the problem.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from tljax.porting.merge import PortError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# A state dict's pickle only describes tensors (ResNet-50's is 33 KB); the data lives elsewhere.
MAX_PICKLE_BYTES = 64 << 20
# Containers nested deeper than this are refused; a state dict wrapped in a checkpoint needs ~10.
MAX_DEPTH = 64
# Hashing a tuple walks all it holds, shared parts again each time (torch's tuples hold ~15).
MAX_TUPLE_NODES = 1 << 20
MAX_NDIM = 32
# A shape whose dimensions (zeros counted as 1) multiply past this is refused even when empty.
MAX_SHAPE_PRODUCT = 1 << 40
# All views together may copy out at most this many times the elements the storages hold
# (tied weights read one storage twice; more is an aliasing bomb).
ALIAS_FACTOR = 4

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 3, 60, 60

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

  @property
  def nbytes(self) -> int:
    return self.numel * self.stype.itemsize

  def fill(self, raw: bytes, big_endian: bool, where: str):
    if len(raw) != self.nbytes:
      raise PortError(f'{where}: storage {self.key} has {len(raw)} bytes, needs {self.nbytes} '
                      f'({self.numel} {self.stype.name} elements); file truncated, corrupt or '
                      'crafted')
    if self.stype.dtype == 'bfloat16':
      bits = np.frombuffer(raw, dtype='>u2' if big_endian else '<u2').astype(np.uint32)
      self.data = (bits << 16).view(np.float32)
    else:
      dtype = np.dtype(self.stype.dtype).newbyteorder('>' if big_endian else '<')
      self.data = np.frombuffer(raw, dtype=dtype).astype(np.dtype(self.stype.dtype), copy=False)

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
    ints = lambda xs: all(type(v) is int and v >= 0 for v in xs)
    if not (type(offset) is int and offset >= 0 and len(size) == len(stride) and ints(size)
            and ints(stride)):
      raise PortError(f'malformed tensor geometry: offset={_brief.repr(offset)} '
                      f'size={_brief.repr(size)} stride={_brief.repr(stride)}')
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def check(self, name: str) -> int:
    """Elements this view copies out; refuses views that would read more than their storage holds.

    Runs before anything is allocated: a 542-byte file can declare a
    20000x20000 view of one element (stride 0) or a 1e6x1e6 one.
    """
    where = f'tensor {name!r} (storage {self.storage.key}, shape {self.size})'
    if len(self.size) > MAX_NDIM:
      raise PortError(f'{where}: {len(self.size)} dimensions, at most {MAX_NDIM} are supported')
    if math.prod(max(n, 1) for n in self.size) > MAX_SHAPE_PRODUCT:
      raise PortError(f'{where}: its dimensions multiply past {MAX_SHAPE_PRODUCT}')
    count = math.prod(self.size)
    if count == 0:
      return 0
    for n, s in zip(self.size, self.stride):
      if n > 1 and s == 0:
        raise PortError(f'{where}: stride 0 on a dimension of {n} repeats stored elements '
                        f'(strides {self.stride})')
    available = self.storage.numel - self.offset
    if count > available:
      raise PortError(f'{where}: needs {count} elements, its storage holds {max(available, 0)} '
                      f'from offset {self.offset}')
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= self.storage.numel:
      raise PortError(f'{where}: at offset {self.offset} with strides {self.stride} it reads '
                      f'past the end of its storage ({self.storage.numel} elements)')
    return count

  def materialize(self) -> np.ndarray:
    data = self.storage.resolve()
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= data.size:   # `check` refused this already; as_strided must never see it
      raise PortError(f'tensor of shape {self.size} reads past the end of storage '
                      f'{self.storage.key}')
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
      raise PortError(f'{self._where}: unsupported persistent id {_brief.repr(pid)}')
    if self._storage_for is None:
      raise PortError(f'{self._where}: unexpected storage reference in a header pickle')
    return self._storage_for(pid[1:])


_MEMO_PUT = ('PUT', 'BINPUT', 'LONG_BINPUT')
_MEMO_GET = ('GET', 'BINGET', 'LONG_BINGET')


def _check_nesting(stream, where: str) -> None:
  """Refuses a pickle whose containers nest too deep or whose tuples expand too far, unbuilt.

  The unpickler builds nesting without recursion, but then hashes tuple
  keys recursively: a million-deep tuple (2 MB of pickle) overflows the C
  stack, and 64 tuples each holding the previous one twice (a few hundred
  bytes) take 2**64 steps. So the opcodes are read first, each stack slot
  carrying (depth, nodes when expanded): what an opcode pushes is one
  deeper than the deepest slot it consumed and expands to all of them.
  Memo references carry the value as it was memoised; tuples cannot change
  after that, and `_materialize` bounds the depth of the rest.
  """
  stack: list = []   # (depth, nodes); None is a MARK
  memo: dict = {}
  name, pos = 'start', 0
  try:
    for op, arg, pos in pickletools.genops(stream):
      name = op.name
      if name == 'STOP':
        return
      if name == 'MARK':
        stack.append(None)
      elif name in _MEMO_PUT:
        memo[arg] = stack[-1]
      elif name == 'MEMOIZE':
        memo[len(memo)] = stack[-1]
      elif name in _MEMO_GET:
        stack.append(memo[arg])
      elif name == 'DUP':
        stack.append(stack[-1])
      else:
        consumed = []
        before = op.stack_before
        if pickletools.markobject in before:
          while stack[-1] is not None:
            consumed.append(stack.pop())
          stack.pop()
          below = before.index(pickletools.markobject)
        else:
          below = len(before)
        consumed += [stack.pop() for _ in range(below)]
        depth = 1 + max(d for d, _ in consumed) if consumed else 0
        nodes = min(1 + sum(n for _, n in consumed), 1 << 62)
        if depth > MAX_DEPTH:
          raise PortError(f'{where}: pickle nests containers deeper than {MAX_DEPTH} levels '
                          f'(at byte {pos}); not a plain state dict')
        if nodes > MAX_TUPLE_NODES and op.stack_after[0].name in ('tuple', 'frozenset'):
          raise PortError(f'{where}: pickle builds a {op.stack_after[0].name} that expands to '
                          f'{nodes} nested items (at byte {pos}); not a plain state dict')
        stack.extend([(depth, nodes)] * len(op.stack_after))
  except (IndexError, KeyError, TypeError) as e:
    raise PortError(f'{where}: malformed pickle ({name} at byte {pos}: '
                    f'{type(e).__name__}); file corrupt or crafted') from None


def _unpickle(stream, storage_for, where: str):
  start = stream.tell()
  _check_nesting(stream, where)
  stream.seek(start)
  return _RestrictedUnpickler(stream, storage_for, where).load()


class _Bounded(io.RawIOBase):
  """A file that refuses reads past its end instead of allocating what a length field asks."""

  def __init__(self, f, size: int, where: str):
    super().__init__()
    self._f, self._size, self._where = f, size, where

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._f.tell()

  def seek(self, pos, whence=0):
    return self._f.seek(pos, whence)

  def readinto(self, buf):
    return self._f.readinto(buf)

  def peek(self, n=0):
    return self._f.peek(n)

  def read(self, n=-1):
    left = self._size - self._f.tell()
    if n is None or n < 0:
      n = left
    if n > left:
      raise PortError(f'{self._where}: a pickle field claims {n} bytes where {left} are left '
                      '(file truncated, corrupt or crafted)')
    return self._f.read(n)

  def readline(self, limit=-1):
    return self._f.readline(limit)


def _check_storage_args(args, where):
  stype, key, numel = args[0], args[1], args[3]
  if not isinstance(stype, _StorageType):
    raise PortError(f'{where}: storage of unknown type {_brief.repr(stype)}')
  if type(key) not in (str, int):
    raise PortError(f'{where}: storage key {_brief.repr(key)} is not a name')
  if type(numel) is not int or numel < 0:
    raise PortError(f'{where}: storage {key!r} has invalid size {_brief.repr(numel)}')
  return stype, str(key), numel


def _same_storage(st: _Storage, stype: _StorageType, numel: int, where: str) -> _Storage:
  """Every reference to one storage must declare the same bytes as the first."""
  if numel * stype.itemsize != st.nbytes:
    raise PortError(f'{where}: storage {st.key} is declared as {st.numel} {st.stype.name} and '
                    f'as {numel} {stype.name} elements')
  return st


def _read_member(zf: zipfile.ZipFile, name: str, nbytes: int | None, limit: int, path: str,
                 what: str) -> bytes:
  """A zip member's bytes, inflating at most one byte more than it may hold.

  `nbytes` (what the pickle declares) or else `limit` bounds the member;
  the zip directory's size must agree before anything is inflated, and the
  stream is read only that far (a 1 MB member can inflate to a GiB).
  """
  size = zf.getinfo(name).file_size
  want = size if nbytes is None else nbytes
  if nbytes is None and size > limit:
    raise PortError(f'{path}: {name} inflates to {size} bytes, more than the {limit} a {what} '
                    'may have; not a plain torch.save checkpoint')
  if size != want:
    raise PortError(f'{path}: {name} has {size} bytes, needs {want} ({what}); file truncated, '
                    'corrupt or crafted')
  with zf.open(name) as member:
    raw = member.read(want + 1)
  if len(raw) != want:
    raise PortError(f'{path}: {name} has {len(raw)} bytes, needs {want} ({what}); file '
                    'truncated, corrupt or crafted')
  return raw


def _load_zip(path: str, zf: zipfile.ZipFile):
  """(unpickled object, elements held by all storages)."""
  names = set(zf.namelist())
  pkls = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    hint = ' (a TorchScript archive? export a state_dict instead)' if any(
        n.endswith('constants.pkl') for n in names) else ''
    raise PortError(f'{path}: zip file without exactly one <dir>/data.pkl{hint}; not a torch.save '
                    'checkpoint')
  prefix = pkls[0][:-len('data.pkl')]
  big_endian = False
  if prefix + 'byteorder' in names:
    order = _read_member(zf, prefix + 'byteorder', None, 16, path, 'byteorder tag')
    order = order.decode('ascii', 'replace').strip()
    if order not in ('little', 'big'):
      raise PortError(f'{path}: unknown byteorder {order!r}')
    big_endian = order == 'big'
  storages: dict[str, _Storage] = {}

  def storage_for(args):
    if len(args) != 4:
      raise PortError(f'{path}: malformed storage reference {_brief.repr(args)}')
    stype, key, numel = _check_storage_args(args, path)
    if key in storages:
      return _same_storage(storages[key], stype, numel, path)
    entry = f'{prefix}data/{key}'
    if entry not in names:
      raise PortError(f'{path}: storage {entry} is missing from the archive')
    st = _Storage(key, stype, numel)
    st.fill(_read_member(zf, entry, st.nbytes, 0, path,
                         f'storage {key}: {numel} {stype.name} elements'), big_endian, path)
    storages[key] = st
    return st

  pkl = _read_member(zf, pkls[0], None, MAX_PICKLE_BYTES, path, 'state dict pickle')
  result = _unpickle(io.BytesIO(pkl), storage_for, path)
  return result, sum(st.numel for st in storages.values())


def _load_legacy(path: str, f) -> Any:
  """(unpickled object, elements held by all root storages)."""
  size = os.fstat(f.fileno()).st_size
  stream = _Bounded(f, size, path)
  header = lambda: _unpickle(stream, None, path)
  if header() != LEGACY_MAGIC:
    raise PortError(f'{path}: bad magic number; not a PyTorch checkpoint')
  protocol = header()
  if protocol != LEGACY_PROTOCOL:
    raise PortError(f'{path}: unsupported legacy protocol version {_brief.repr(protocol)}')
  header()  # sys_info; torch writes legacy storages little-endian on every platform
  storages: dict[str, _Storage] = {}
  views: dict[str, _Storage] = {}

  def storage_for(args):
    if len(args) != 5:
      raise PortError(f'{path}: malformed storage reference {_brief.repr(args)}')
    stype, key, numel = _check_storage_args(args, path)
    if key in storages:
      root = _same_storage(storages[key], stype, numel, path)
    else:
      root = storages[key] = _Storage(key, stype, numel)
    if args[4] is None:
      return root
    # Old files reference storage views as (view_key, offset, size) within a root storage.
    view = args[4]
    if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int
            and type(view[2]) is int and view[1] >= 0 and view[2] >= 0
            and view[1] + view[2] <= root.numel):
      raise PortError(f'{path}: malformed storage view {_brief.repr(view)} of storage {key} '
                      f'({root.numel} elements)')
    view_key, offset, view_size = view
    return views.setdefault(str(view_key), _Storage(str(view_key), stype, view_size,
                                                     (root, offset)))

  result = _unpickle(stream, storage_for, path)
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
    if st.nbytes > size - f.tell():
      raise PortError(f'{path}: file ends inside storage {key} (truncated)')
    st.fill(f.read(st.nbytes), False, path)
  return result, sum(st.numel for st in storages.values())


def _materialize(obj, stored: int):
  """Copies every view out of its storage, after checking them all against the storages.

  All checks run before the first copy, so nothing is allocated for a file
  that is refused; views together may copy out at most `ALIAS_FACTOR`
  times the `stored` elements. Shared containers are walked once.
  """
  tensors: dict[int, _LazyTensor] = {}
  seen: set[int] = set()
  budget = ALIAS_FACTOR * stored

  def check(o, name, depth):
    nonlocal budget
    if depth > MAX_DEPTH:
      raise PortError(f'containers nest deeper than {MAX_DEPTH} levels at {name!r}; not a plain '
                      'state dict')
    if isinstance(o, _LazyTensor):
      if id(o) not in tensors:
        budget -= o.check(name)
        if budget < 0:
          raise PortError(f'tensor {name!r} (storage {o.storage.key}) brings the elements views '
                          f'copy out past {ALIAS_FACTOR}x the {stored} the storages hold; views '
                          'aliasing one storage over and over are refused')
        tensors[id(o)] = o
      return
    if isinstance(o, (dict, list, tuple)):
      if id(o) in seen:
        return
      seen.add(id(o))
      items = o.items() if isinstance(o, dict) else enumerate(o)
      for k, v in items:
        k = k if isinstance(k, (str, int)) else _brief.repr(k)
        check(v, f'{name}/{k}' if name else str(k), depth + 1)
    elif isinstance(o, (set, frozenset)) and any(isinstance(v, _Inert) for v in o):
      raise PortError(f'checkpoint holds a {type(o).__name__} of tensors at {name!r}')
    elif isinstance(o, _Inert):
      raise PortError(f'checkpoint holds a bare {type(o).__name__}, expected tensors')

  check(obj, '', 0)
  built = {i: t.materialize() for i, t in tensors.items()}

  def build(o):
    if id(o) in built:
      return built[id(o)]
    if isinstance(o, dict):
      out = collections.OrderedDict() if isinstance(o, collections.OrderedDict) else {}
      for k, v in o.items():
        out[k] = build(v)
    elif isinstance(o, (list, tuple)):
      out = type(o)(build(v) for v in o)
    else:
      return o
    built[id(o)] = out
    return out

  return build(obj)


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
          return _materialize(*_load_zip(path, zf))
      if head[:1] == b'\x80':
        return _materialize(*_load_legacy(path, f))
  except PortError as e:
    if str(e).startswith(path):
      raise
    raise PortError(f'{path}: {e}') from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
          AttributeError, IndexError, KeyError, struct.error, UnicodeDecodeError, OSError,
          MemoryError, RecursionError) as e:
    raise PortError(f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
                    f'{type(e).__name__}: {_brief.repr(str(e))[1:-1]}') from e
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
