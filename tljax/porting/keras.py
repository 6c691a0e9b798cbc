"""Keras applications weight files (.h5) → Flax variables, read with h5py alone.

Keras loads these files by topology: the i-th layer with weights in the file
goes to the i-th layer with weights in the model, whatever its name. The
official files carry auto-generated names (`conv2d_37`, `batch_normalization_37`)
whose numbers depend on what the saving session had built before, so this
port maps by the same order and never by those names. The order is Keras'
functional-graph order (layers sorted by decreasing depth, ties by the order a
depth-first walk from the output meets them), which interleaves InceptionV3's
branches; `keras_layers` derives it from the architecture description the
Flax module itself runs, so the two cannot drift apart.

Two layouts are read:
  * legacy HDF5 (the official files; `model.save('x.h5')`): `layer_names`
    attribute in topology order, per layer a `weight_names` attribute; the
    weights of a whole-model file sit under `model_weights`.
  * Keras 3 `.weights.h5` (`model.save_weights`): `layers/<class>_<k>/vars/<i>`,
    numbered per layer class in topology order, so the same order is
    recovered class by class.

Layers whose name Keras sets explicitly (`conv_pw_1`, `block_3_expand`,
`predictions`, ...) are also checked by name. Everything that does not line
up is reported in one `PortError`, with a guess of which architecture/alpha
the file really holds.

An `.h5` can point outside itself and can declare more than it holds, so
the file is read in two passes. The first reads headers only and refuses,
in one line naming the dataset: external links, soft links that do not
resolve inside the file, datasets with external raw storage (their bytes
come from any local file) or virtual ones, filters Keras never writes
(only gzip, shuffle and fletcher32, as h5repack adds them, are allowed)
and non-float types. Declared shapes are then matched against the model,
and only a file that fits is read; gzip chunks are first inflated here with
a bound, since HDF5's own inflate grows its buffer as far as a chunk asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tljax.data.preprocess import KERAS_TF
from tljax.models import inception
from tljax.models import mobilenet_keras as mk
from tljax.porting.catalog import WeightSpec
from tljax.porting.merge import PortError, check_finite, flatten, unflatten

ARCHS = ('inception_v3', 'mobilenet_v1', 'mobilenet_v2_keras')
_ROLES = {
    'conv': ('kernel',),
    'dwconv': ('kernel',),
    'bn': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
    'bn_noscale': ('beta', 'moving_mean', 'moving_variance'),
    'dense': ('kernel', 'bias'),
    'conv_dense': ('kernel', 'bias'),
}
_CLASS = {'conv': 'conv2d', 'conv_dense': 'conv2d', 'dwconv': 'depthwise_conv2d',
          'bn': 'batch_normalization', 'bn_noscale': 'batch_normalization', 'dense': 'dense'}
_HEAD_NAMES = {'inception_v3': ('predictions',), 'mobilenet_v1': ('conv_preds',),
               # Keras 2's keras-applications named MobileNetV2's classifier 'Logits'.
               'mobilenet_v2_keras': ('predictions', 'Logits')}


# ---------------------------------------------------------------- official files

_BASE_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/'
# Keras publishes digests only for InceptionV3, and they are MD5 (32 hex digits, checked by
# `keras.utils.get_file`), not SHA-256; the MobileNet files have none. So `sha256` stays None
# everywhere and the MD5s are kept here.
MD5 = {'inception_v3': '9a0d58056eeedaa3f26cb7ebd46da564',
       'inception_v3:notop': 'bcbd6486424b2319ff4ef7d526e38f63'}
_V1_ALPHA_TEXT = {1.0: '1_0', 0.75: '7_5', 0.5: '5_0', 0.25: '2_5'}


def _variant(alpha: float, rows: int, top: bool) -> str:
  """'' for alpha 1.0 at 224 with top; otherwise e.g. 'alpha0.5', 'alpha0.35_160_notop', 'notop'."""
  parts = ([f'alpha{alpha}'] if alpha != 1.0 else []) + ([str(rows)] if rows != 224 else [])
  return '_'.join(parts + ([] if top else ['notop']))


def _spec(arch: str, url_path: str, variant: str, size: int, **arch_kw) -> WeightSpec:
  return WeightSpec(source='keras', arch=arch, url=_BASE_URL + url_path,
                    filename=url_path.rsplit('/', 1)[-1], sha256=None,
                    preprocessing=dataclasses.replace(KERAS_TF, input_size=size, resize=size),
                    arch_kw=arch_kw, variant=variant)


def _catalog() -> dict[str, WeightSpec]:
  """Every file `keras.applications` downloads for these models (MobileNets: per alpha and size)."""
  stem = 'inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels'
  specs = [_spec('inception_v3', f'{stem}.h5', '', 299),
           _spec('inception_v3', f'{stem}_notop.h5', 'notop', 299)]
  for top in (True, False):
    end = '' if top else '_no_top'
    for alpha in mk.V1_ALPHAS:
      for rows in (128, 160, 192, 224):
        name = f'mobilenet_{_V1_ALPHA_TEXT[alpha]}_{rows}_tf{end}.h5'
        specs.append(_spec('mobilenet_v1', f'mobilenet/{name}', _variant(alpha, rows, top), rows,
                           alpha=alpha))
    for alpha in mk.V2_ALPHAS:
      for rows in (96, 128, 160, 192, 224):
        name = f'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}{end}.h5'
        specs.append(_spec('mobilenet_v2_keras', f'mobilenet_v2/{name}', _variant(alpha, rows, top),
                           rows, alpha=alpha))
  return {s.key: s for s in specs}


CATALOG: dict[str, WeightSpec] = _catalog()


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """A layer with weights, as Keras stores it: kind, Flax path, explicit Keras name (if any)."""

  kind: str
  path: str
  names: tuple[str, ...] = ()

  @property
  def is_head(self) -> bool:
    return self.path.startswith('head/')


@dataclasses.dataclass(frozen=True)
class H5Weight:
  """A vetted weight dataset, known by its header only until `read` (once its shape fits)."""

  dataset: Any
  where: str
  shape: tuple[int, ...]
  filters: tuple[int, ...]

  def read(self, path: str) -> np.ndarray:
    _check_chunks(self, path)
    out = np.empty(self.shape, np.float32)
    if out.size:
      self.dataset.read_direct(out)   # HDF5 converts float16/64 and byte order
    return out


@dataclasses.dataclass
class FileLayer:
  name: str
  weights: list[tuple[str, H5Weight]]
  real_name: bool = True   # False: Keras 3 files written before layer names were stored.


# ---------------------------------------------------------------- expected layers, in Keras order

def _inception_layers() -> list[KerasLayer]:
  """Keras' layer order for InceptionV3, from `inception.STEM`/`BLOCKS` as Keras builds them."""
  parents: list[list[int]] = [[]]   # node 0: the input
  weighted: dict[int, KerasLayer] = {}

  def add(parent_ids, layer=None):
    parents.append(list(parent_ids))
    if layer is not None:
      weighted[len(parents) - 1] = layer
    return len(parents) - 1

  def units(seq, node, prefix):
    for unit in seq:
      if isinstance(unit, inception.ConvSpec):
        path = f'backbone/{prefix}{unit.name}'
        node = add([node], KerasLayer('conv', f'{path}/conv'))
        node = add([node], KerasLayer('bn_noscale', f'{path}/bn'))
        node = add([node])                                     # Activation('relu')
      elif isinstance(unit, inception.Split):
        node = add([units(f, node, prefix) for f in unit.forks])   # concatenate
      else:
        node = add([node])                                     # pooling
    return node

  node = units(inception.STEM, 0, '')
  for name, branches in inception.BLOCKS:
    node = add([units(b, node, f'{name}/') for b in branches])
  node = add([node])                                           # GlobalAveragePooling2D
  out = add([node], KerasLayer('dense', 'head/logits', ('predictions',)))

  depth = [0] * len(parents)
  for n in range(out, -1, -1):          # parents are created before children
    for p in parents[n]:
      depth[p] = max(depth[p], depth[n] + 1)
  first_seen: dict[int, int] = {}
  stack = [out]
  while stack:                          # pre-order depth-first walk from the output
    n = stack.pop()
    if n in first_seen:
      continue
    first_seen[n] = len(first_seen)
    stack.extend(reversed(parents[n]))
  order = sorted(weighted, key=lambda n: (-depth[n], first_seen[n]))
  return [weighted[n] for n in order]


def _mobilenet_v1_layers() -> list[KerasLayer]:
  layers = [KerasLayer('conv', 'backbone/conv1', ('conv1',)),
            KerasLayer('bn', 'backbone/conv1_bn', ('conv1_bn',))]
  for i in range(1, len(mk.V1_BLOCKS) + 1):
    for name, kind in ((f'conv_dw_{i}', 'dwconv'), (f'conv_dw_{i}_bn', 'bn'),
                       (f'conv_pw_{i}', 'conv'), (f'conv_pw_{i}_bn', 'bn')):
      layers.append(KerasLayer(kind, f'backbone/{name}', (name,)))
  return layers + [KerasLayer('conv_dense', 'head/logits', _HEAD_NAMES['mobilenet_v1'])]


def _mobilenet_v2_layers(alpha: float) -> list[KerasLayer]:
  names = [('Conv1', 'conv'), ('bn_Conv1', 'bn')]
  for b in mk.v2_blocks(alpha)[0]:
    steps = (('expand', 'conv'),) if b.block_id else ()
    for step, kind in steps + (('depthwise', 'dwconv'), ('project', 'conv')):
      names += [(f'{b.prefix}{step}', kind), (f'{b.prefix}{step}_BN', 'bn')]
  names += [('Conv_1', 'conv'), ('Conv_1_bn', 'bn')]
  return ([KerasLayer(kind, f'backbone/{n}', (n,)) for n, kind in names] +
          [KerasLayer('dense', 'head/logits', _HEAD_NAMES['mobilenet_v2_keras'])])


def keras_layers(arch: str, alpha: float = 1.0) -> list[KerasLayer]:
  """Every layer with weights of the full Keras model (with top), in Keras' storage order."""
  if arch == 'inception_v3':
    return _inception_layers()
  if arch == 'mobilenet_v1':
    return _mobilenet_v1_layers()
  if arch == 'mobilenet_v2_keras':
    return _mobilenet_v2_layers(alpha)
  raise ValueError(f'no Keras port for {arch!r}; choose one of {", ".join(ARCHS)}')


# ---------------------------------------------------------------- reading the file

def _short(weight_name: str) -> str:
  """'conv2d_37/kernel:0' → 'kernel'; Keras 2 called depthwise kernels 'depthwise_kernel'."""
  short = weight_name.rsplit('/', 1)[-1].split(':')[0]
  return 'kernel' if short == 'depthwise_kernel' else short


_GZIP, _SHUFFLE, _FLETCHER32 = 1, 2, 3   # HDF5's filter ids
_FILTER_NAMES = {_GZIP: 'gzip', _SHUFFLE: 'shuffle', _FLETCHER32: 'fletcher32'}
_FLOATS = tuple(np.dtype(f'{order}f{n}') for order in '<>' for n in (2, 4, 8))
_MAX_ATTR_ITEMS = 1 << 20
_MAX_SOFT_LINK_HOPS = 16


def _unreadable(path: str, e: Exception) -> str:
  detail = str(e).splitlines()[0] if str(e) else type(e).__name__
  if 'file signature not found' in detail:
    return (f'{path}: not an HDF5 file (no HDF5 signature); --source=keras expects a Keras .h5 or '
            '.weights.h5 file')
  if 'truncated' in detail:
    return f'{path}: HDF5 file is truncated ({detail}); download it again'
  return (f'{path}: unreadable HDF5 file ({detail}); it is corrupt or truncated, download it '
          'again')


@contextlib.contextmanager
def open_h5(path: str):
  """The file, read-only; HDF5 errors inside become one-line `PortError`s."""
  import h5py
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise PortError(_unreadable(path, e)) from None
  with f:
    try:
      yield f
    except (OSError, RuntimeError) as e:
      raise PortError(_unreadable(path, e)) from None


def _walk(group, rel: str, path: str, hops: int = 0):
  """The object at `rel` under `group` (None if absent), never leaving the file.

  Each component is looked up as a link first: hard links are followed,
  soft links only to an object inside the file, external and user-defined
  links never (HDF5 itself would open whatever file they name).
  """
  import h5py
  node = group.file if rel.startswith('/') else group
  for part in (p for p in rel.split('/') if p and p != '.'):
    if not isinstance(node, h5py.Group):
      return None
    where = f'{node.name.rstrip("/")}/{part}'
    link = node.get(part, getlink=True)
    if link is None:
      return None
    if isinstance(link, h5py.HardLink):
      node = node[part]
    elif isinstance(link, h5py.SoftLink):
      if hops >= _MAX_SOFT_LINK_HOPS:
        raise PortError(f'{path}: {where}: soft links nest more than {_MAX_SOFT_LINK_HOPS} deep '
                        '(a loop?)')
      target = _walk(node, link.path, path, hops + 1)
      if target is None:
        raise PortError(f'{path}: {where} is a soft link to {link.path}, which does not resolve '
                        'inside the file')
      node = target
    elif isinstance(link, h5py.ExternalLink):
      raise PortError(f'{path}: {where} is an external link to {link.filename}:{link.path}; '
                      'links out of the file are not followed')
    else:
      raise PortError(f'{path}: {where} is a {type(link).__name__}; only hard links and soft '
                      'links inside the file are followed')
  return node


def _dataset(group, rel: str, path: str) -> H5Weight:
  """Vets the dataset at `rel` from its header alone: where its bytes live, filters, type."""
  import h5py
  from h5py import h5d
  dset = _walk(group, rel, path)
  where = f'{group.name.rstrip("/")}/{rel}'
  if dset is None:
    raise PortError(f'{path}: weight {where} is listed but missing from the file (truncated or '
                    'corrupt)')
  if not isinstance(dset, h5py.Dataset):
    raise PortError(f'{path}: weight {where} is a {type(dset).__name__}, not a dataset')
  where = dset.name
  dcpl = dset.id.get_create_plist()
  layout = dcpl.get_layout()
  if layout == h5d.VIRTUAL:
    raise PortError(f'{path}: dataset {where} is a virtual dataset (its data comes from other '
                    'datasets or files); Keras never writes one')
  if dcpl.get_external_count():
    name = dcpl.get_external(0)[0].decode('utf8', 'replace')
    raise PortError(f'{path}: dataset {where} uses external storage (its bytes come from '
                    f'{name!r}, outside the .h5); Keras never writes one')
  filters = tuple(dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters()))
  for i, code in enumerate(filters):
    if code not in _FILTER_NAMES:
      name = dcpl.get_filter(i)[3].decode('utf8', 'replace')
      raise PortError(f'{path}: dataset {where} uses HDF5 filter {name!r} (id {code}); Keras '
                      'weights use none, or gzip, shuffle and fletcher32 at most')
  if len(set(filters)) != len(filters):
    raise PortError(f'{path}: dataset {where} applies one filter twice ({filters})')
  try:
    dtype = dset.dtype
  except TypeError as e:
    raise PortError(f'{path}: dataset {where} has an HDF5 type numpy cannot hold ({e})') from None
  if dtype not in _FLOATS:
    raise PortError(f'{path}: dataset {where} has dtype {dtype}; Keras weights are float16, '
                    'float32 or float64')
  if dset.shape is None:
    raise PortError(f'{path}: dataset {where} has no dataspace (an empty placeholder)')
  shape = tuple(int(n) for n in dset.shape)
  if layout == h5d.CHUNKED and math.prod(dset.chunks) > max(1, math.prod(shape)):
    raise PortError(f'{path}: dataset {where} declares chunks of {dset.chunks}, larger than its '
                    f'shape {shape}')
  return H5Weight(dset, where, shape, filters)


def _check_chunks(w: H5Weight, path: str) -> None:
  """Inflates each gzip chunk with a bound before HDF5 reads it (its inflate has none).

  A 2.7 MB chunk declared for 64 floats inflates to 600 MB inside HDF5
  before any size check; here no chunk may inflate past its chunk size.
  """
  if not w.filters:
    return
  dsid, chunks = w.dataset.id, w.dataset.chunks
  chunk_bytes = math.prod(chunks) * w.dataset.dtype.itemsize
  grid = math.prod(-(-n // c) for n, c in zip(w.shape, chunks))
  count = dsid.get_num_chunks()
  if count > grid:
    raise PortError(f'{path}: dataset {w.where} stores {count} chunks, its shape has room for '
                    f'{grid}')
  gzip_bit = 1 << w.filters.index(_GZIP) if _GZIP in w.filters else 0
  # fletcher32 applied before gzip on writing puts its 4-byte checksum inside the stream.
  slack = 4 if (gzip_bit and _FLETCHER32 in w.filters
                and w.filters.index(_FLETCHER32) < w.filters.index(_GZIP)) else 0
  for i in range(count):
    info = dsid.get_chunk_info(i)
    if info.size > 2 * chunk_bytes + 1024:
      raise PortError(f'{path}: dataset {w.where} stores a {info.size}-byte chunk for '
                      f'{chunk_bytes} bytes of data')
    if not gzip_bit or info.filter_mask & gzip_bit:
      continue
    _, raw = dsid.read_direct_chunk(info.chunk_offset)
    try:
      inflated = len(zlib.decompressobj().decompress(raw, chunk_bytes + slack + 1))
    except zlib.error as e:
      raise PortError(f'{path}: dataset {w.where} has a chunk that is not a gzip stream ({e}); '
                      'file corrupt') from None
    if inflated > chunk_bytes + slack:
      raise PortError(f'{path}: dataset {w.where} has a gzip chunk that inflates past its '
                      f'{chunk_bytes} bytes (a decompression bomb)')


def _attr_list(group, name: str, path: str) -> list[str] | None:
  """A string-list attribute; Keras splits long ones into `name0`, `name1`, ..."""
  if name in group.attrs:
    names = [name]
  elif f'{name}0' in group.attrs:
    names, i = [], 0
    while f'{name}{i}' in group.attrs:
      names.append(f'{name}{i}')
      i += 1
  else:
    return None
  values = []
  for n in names:
    attr = group.attrs.get_id(n)
    items = math.prod(attr.shape or ())
    if items > _MAX_ATTR_ITEMS or (items and attr.dtype.kind not in 'SUO'):
      raise PortError(f'{path}: attribute {n} of {group.name} is not a list of names '
                      f'({items} items of {attr.dtype})')
    values += list(np.atleast_1d(group.attrs[n]))
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def read_h5(f, path: str) -> tuple[str, list[FileLayer] | dict[str, list[FileLayer]]]:
  """('legacy', layers in topology order) or ('keras3', {layer class: layers in order}).

  `f` is an open `h5py.File` (see `open_h5`); only headers are read.
  """
  import h5py
  root = _walk(f, 'model_weights', path) if 'model_weights' in f else f
  if not isinstance(root, h5py.Group):
    raise PortError(f'{path}: model_weights is not a group; not a Keras weights file')
  layer_names = _attr_list(root, 'layer_names', path)
  if layer_names is not None:
    layers = []
    for name in layer_names:
      group = _walk(root, name, path)
      if not isinstance(group, h5py.Group):
        raise PortError(f'{path}: layer_names lists {name!r} but the file has no such group '
                        '(truncated or corrupt)')
      weight_names = _attr_list(group, 'weight_names', path) or []
      if weight_names:
        layers.append(FileLayer(name, [(w, _dataset(group, w, path)) for w in weight_names]))
    return 'legacy', layers
  layers_group = _walk(root, 'layers', path) if 'layers' in root else None
  if isinstance(layers_group, h5py.Group):
    by_class: dict[str, list[tuple[int, FileLayer]]] = {}
    for key in layers_group.keys():
      group = _walk(layers_group, key, path)
      vars_ = _walk(group, 'vars', path) if isinstance(group, h5py.Group) else None
      if not isinstance(vars_, h5py.Group) or not len(vars_):
        continue
      m = re.fullmatch(r'(.*?)(?:_(\d+))?', key)
      has_name = 'name' in vars_.attrs
      name = (_attr_list(vars_, 'name', path) or [key])[0] if has_name else key
      weights = [(f'{name}/{i}', _dataset(vars_, str(i), path)) for i in range(len(vars_))]
      layer = FileLayer(name, weights, real_name=has_name)
      by_class.setdefault(m.group(1), []).append((int(m.group(2) or 0), layer))
    return 'keras3', {cls: [l for _, l in sorted(v, key=lambda t: t[0])]
                      for cls, v in by_class.items()}
  raise PortError(f'{path} is not a Keras weights file: it has neither a `layer_names` attribute '
                  '(legacy .h5) nor a `layers` group (Keras 3 .weights.h5).')


def _pair(layout: str, content, expected: Sequence[KerasLayer]):
  """[(expected layer, file layer or None)], [file layers left over] by Keras' order."""
  if layout == 'legacy':
    pairs = [(e, content[i] if i < len(content) else None) for i, e in enumerate(expected)]
    return pairs, list(content[len(expected):])
  queues = {cls: list(layers) for cls, layers in content.items()}
  pairs = [(e, queues[_CLASS[e.kind]].pop(0) if queues.get(_CLASS[e.kind]) else None)
           for e in expected]
  return pairs, [l for layers in queues.values() for l in layers]


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """A Flax leaf to be read from `weight`, reshaped to `shape` (same elements, same order)."""

  weight: H5Weight
  shape: tuple[int, ...]

  def read(self, path: str) -> np.ndarray:
    return self.weight.read(path).reshape(self.shape)


def _convert(e: KerasLayer, fl: FileLayer) -> tuple[dict[str, _Leaf], list[str]]:
  """Flax leaves of one layer (paths under 'params/' / 'batch_stats/') and any problems."""
  roles = _ROLES[e.kind]
  if len(fl.weights) != len(roles):
    got = ', '.join(f'{w} {a.shape}' for w, a in fl.weights)
    return {}, [f'{fl.name}: expected {len(roles)} weights ({", ".join(roles)}) for {e.path}, '
                f'found {len(fl.weights)}: {got}']
  named = [_short(w) for w, _ in fl.weights]
  if all(n in _ROLES['bn'] + ('kernel', 'bias') for n in named) and named != list(roles):
    return {}, [f'{fl.name}: weights {named} where {e.path} needs {list(roles)}']
  out = {}
  for role, (_, a) in zip(roles, fl.weights):
    shape = a.shape
    if role == 'kernel' and e.kind == 'dwconv':
      if len(shape) != 4:
        return {}, [f'{fl.name}: depthwise kernel of shape {shape} is not 4-D']
      shape = (shape[0], shape[1], 1, shape[2] * shape[3])
    elif role == 'kernel' and e.kind == 'conv_dense':
      if len(shape) != 4 or shape[:2] != (1, 1):
        return {}, [f'{fl.name}: 1x1 conv classifier kernel expected, found shape {shape}']
      shape = shape[2:]
    target = {'kernel': 'params/{}/kernel', 'bias': 'params/{}/bias', 'gamma': 'params/{}/scale',
              'beta': 'params/{}/bias', 'moving_mean': 'batch_stats/{}/mean',
              'moving_variance': 'batch_stats/{}/var'}[role]
    out[target.format(e.path)] = _Leaf(a, shape)
  return out, []


# ---------------------------------------------------------------- matching against a model

@dataclasses.dataclass
class PortReport:
  """What a port did besides loading: head re-initialised, file layers ignored (and why)."""

  layout: str
  loaded_layers: int = 0
  reinitialised: list[str] = dataclasses.field(default_factory=list)
  head_reason: str = ''
  ignored: list[str] = dataclasses.field(default_factory=list)


@functools.lru_cache(maxsize=32)
def _model_shapes(arch: str, num_classes: int, arch_kw: tuple) -> tuple:
  """(model, {flat variable path: shape}) from an abstract init (no compute, no compile)."""
  from tljax import models
  model = models.create(arch, num_classes, **dict(arch_kw))
  size = models.input_size(arch, **dict(arch_kw))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return model, {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def _match(layout, content, arch: str, num_classes: int, arch_kw: dict, strict_names: bool = True):
  """(flat Flax leaves, model, shapes, report, problems) of the file against `arch(**arch_kw)`."""
  model, shapes = _model_shapes(arch, num_classes, tuple(sorted(arch_kw.items())))
  pairs, leftover = _pair(layout, content, keras_layers(arch, arch_kw.get('alpha', 1.0)))
  cut = arch_kw.get('cut')
  blocks = ({name for name, _ in inception.blocks_until(cut)} if arch == 'inception_v3' else None)

  def in_model(e: KerasLayer) -> bool:
    part = e.path.split('/')[1]
    return blocks is None or e.is_head or not part.startswith('mixed') or part in blocks

  report, problems, flat = PortReport(layout), [], {}
  head_file = next((fl for e, fl in pairs if e.is_head), None)
  reasons = [r for r, bad in (('the file has no top (notop)', head_file is None),
                              (f'cut={cut!r}', cut not in (None, inception.END_POINTS[-1])),
                              (f'num_classes={num_classes} != 1000', num_classes != 1000)) if bad]
  report.head_reason = '; '.join(reasons)
  missing = []
  for e, fl in pairs:
    if e.is_head and report.head_reason:
      if fl is not None:
        report.ignored.append(f'{fl.name} ({report.head_reason})')
      continue
    if not in_model(e):
      if fl is not None:
        report.ignored.append(f'{fl.name} (after the cut at {cut})')
      continue
    if fl is None:
      missing.append(e.path)
      continue
    if strict_names and e.names and fl.real_name and fl.name not in e.names:
      problems.append(f'layer {fl.name!r} sits where Keras puts {" or ".join(map(repr, e.names))}')
    leaves, errs = _convert(e, fl)
    problems += errs
    for key, a in leaves.items():
      want = shapes.get(key)
      if want is None:
        problems.append(f'{fl.name} → {key}: not in the model')
      elif a.shape != want:
        problems.append(f'{fl.name} → {key}: file {a.shape} vs model {want}')
      flat[key] = a
    report.loaded_layers += 1
  if missing:
    problems.append(f'missing from the file ({len(missing)} layers): ' + ', '.join(missing))
  if leftover:
    problems.append(f'unexpected in the file ({len(leftover)} layers): ' + ', '.join(
        f'{fl.name} {[a.shape for _, a in fl.weights]}' for fl in leftover))
  return flat, model, shapes, report, problems


def _candidates():
  yield 'inception_v3', {}
  for a in mk.V1_ALPHAS:
    yield 'mobilenet_v1', {'alpha': a}
  for a in mk.V2_ALPHAS:
    yield 'mobilenet_v2_keras', {'alpha': a}


def _describe(arch: str, arch_kw: dict, quote: bool = False) -> str:
  return (repr(arch) if quote else arch) + ''.join(f', {k}={v!r}' for k, v in arch_kw.items())


def _count_fits(layout, content, expected: Sequence[KerasLayer]) -> bool:
  """Cheap pre-check: same number of layers (per class for Keras 3), the classifier optional."""
  if layout == 'legacy':
    return len(content) in (len(expected), len(expected) - 1)
  want: dict[str, int] = {}
  for e in expected:
    want[_CLASS[e.kind]] = want.get(_CLASS[e.kind], 0) + 1
  got = {cls: len(layers) for cls, layers in content.items()}
  notop = dict(want)
  notop[_CLASS[expected[-1].kind]] -= 1
  return got in (want, {k: v for k, v in notop.items() if v})


def _guess(layout, content) -> str:
  """Which known architecture/alpha the file holds, as the call that would port it."""
  hits = []
  for arch, kw in _candidates():
    if _count_fits(layout, content, keras_layers(arch, kw.get('alpha', 1.0))) and \
        not _match(layout, content, arch, 1000, kw)[4]:
      hits.append(f'from_keras(path, {_describe(arch, kw, quote=True)})')
  if hits:
    return 'The file holds another architecture or width; port it with ' + ' or '.join(hits) + '.'
  n = len(content) if layout == 'legacy' else sum(map(len, content.values()))
  return (f'The file ({n} layers with weights) matches none of {", ".join(ARCHS)} '
          'at any listed alpha.')


def convert_file(path: str, arch: str, num_classes: int = 1000, *, rng: jax.Array | None = None,
                 strict_names: bool = True, allow_nonfinite: bool = False,
                 **arch_kw) -> tuple[dict, PortReport]:
  """Like `from_keras`, also returning the `PortReport` (what was re-initialised or ignored)."""
  if arch not in ARCHS:
    raise ValueError(f'no Keras port for {arch!r}; choose one of {", ".join(ARCHS)}')
  path = str(path)
  with open_h5(path) as f:
    layout, content = read_h5(f, path)
    leaves, model, shapes, report, problems = _match(layout, content, arch, num_classes, arch_kw,
                                                     strict_names)
    absent = sorted(k for k in shapes if k not in leaves and not
                    (report.head_reason and k.split('/')[1] == 'head'))
    if absent and not problems:
      problems.append(f'model leaves not filled by the file: {", ".join(absent)}')
    if problems:
      lines = [f'{path} ({layout} layout) does not fit {_describe(arch, arch_kw)}.',
               _guess(layout, content), 'Problems:']
      lines += [f'  {p}' for p in problems[:60]]
      if len(problems) > 60:
        lines.append(f'  ... and {len(problems) - 60} more')
      raise PortError('\n'.join(lines))
    flat = {key: leaf.read(path) for key, leaf in leaves.items()}
  if report.head_reason:
    rng = jax.random.key(0) if rng is None else rng
    width = shapes['params/head/logits/kernel'][0]
    fresh = flatten(model.head.init(rng, jnp.zeros((1, width), jnp.float32)))
    for key, value in fresh.items():
      col, rest = key.split('/', 1)
      flat[f'{col}/head/{rest}'] = np.asarray(value)
      report.reinitialised.append(f'{col}/head/{rest}')
  variables = unflatten(flat)
  check_finite(variables, path, allow_nonfinite=allow_nonfinite)
  return variables, report


def from_keras(h5_path, arch: str, num_classes: int = 1000, *, rng: jax.Array | None = None,
               strict_names: bool = True, allow_nonfinite: bool = False, **arch_kw) -> dict:
  """`{'params', 'batch_stats'}` for `tljax.models.create(arch, num_classes, **arch_kw)`.

  `h5_path`: an official Keras applications file (with or without top), a
  legacy `.h5` or a Keras 3 `.weights.h5`. The head is re-initialised (from
  `rng`, default key 0) for notop files, `num_classes != 1000` and cut
  backbones; layers after a cut are ignored. Both are logged.
  `strict_names=False` accepts renamed explicitly-named layers (Keras itself
  only looks at the order). NaN/inf weights are refused unless
  `allow_nonfinite=True`.
  """
  variables, report = convert_file(h5_path, arch, num_classes, rng=rng, strict_names=strict_names,
                                   allow_nonfinite=allow_nonfinite, **arch_kw)
  logging.info('keras port of %s (%s layout): %d layers loaded into %s', h5_path, report.layout,
               report.loaded_layers, _describe(arch, arch_kw))
  if report.reinitialised:
    logging.info('keras port: head re-initialised (%s): %s', report.head_reason,
                 ', '.join(report.reinitialised))
  if report.ignored:
    logging.info('keras port: %d file layers ignored: %s', len(report.ignored),
                 ', '.join(report.ignored))
  return variables
