"""timm / Hugging Face hub checkpoints → tljax variables, plus their preprocessing.

The weights most people fine-tune today sit on the hub as
`timm/<arch>.<tag>/model.safetensors`, with a `config.json` whose
`pretrained_cfg` says how the network saw its images. Both travel into the
port: tensors through the family converters (`TIMM_CONVERTERS` of the
modules in `_FAMILY_MODULES`) and the same strict checks as torchvision's
port, and the preprocessing into the weights' metadata, so predict and
training feed the network what it was trained on.

Files are read without pickle: safetensors through its numpy API, after
checking the header against the file (a truncated download or a non-
safetensors file is one clear line, not a crash deep inside a reader);
a directory holding only `pytorch_model.bin` goes through tljax's own
restricted pickle reader.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
from typing import Any, Callable, Mapping

import jax
import numpy as np

from tljax.data.preprocess import Preprocessing
from tljax.porting import pickle_reader, strict
from tljax.porting.catalog import WeightSpec
from tljax.porting.convert import StateDictReader
from tljax.porting.merge import PortError

# Family modules exposing `TIMM_CONVERTERS: {timm arch: convert(reader, arch)}`.
_FAMILY_MODULES: tuple[str, ...] = ('tljax.porting.timm_cnn', 'tljax.porting.vit',
                                    'tljax.porting.convnext')


CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    arch: fn for m in _FAMILY_MODULES
    for arch, fn in importlib.import_module(m).TIMM_CONVERTERS.items()}
ARCHS = tuple(CONVERTERS)

HUB_URL = 'https://huggingface.co'
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
PICKLE_FILE = 'pytorch_model.bin'
# ViT-B/16 in float32 is ~350 MB; a header claiming more than this is corrupt or hostile.
MAX_FILE_BYTES = 4 << 30
_MAX_HEADER_BYTES = 64 << 20
_FLOAT_DTYPES = {'F16', 'F32', 'F64'}
_IGNORED_SUFFIX = 'num_batches_tracked'

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_INCEPTION_MEAN = _INCEPTION_STD = (0.5, 0.5, 0.5)
_DEFAULT_CROP_PCT = 0.875   # timm's when a cfg gives none


def split_name(name: str) -> tuple[str, str]:
  """'resnet50.a1_in1k' → ('resnet50', 'a1_in1k'); a bare name has tag ''."""
  arch, _, tag = name.partition('.')
  return arch, tag


def hub_id(arch: str, tag: str) -> str:
  return f'timm/{arch}.{tag}' if tag else f'timm/{arch}'


def hub_file_url(repo_id: str, filename: str) -> str:
  return f'{HUB_URL}/{repo_id}/resolve/main/{filename}'


def preprocessing_from_cfg(cfg: Mapping[str, Any], where: str) -> Preprocessing:
  """timm's eval transform for a `pretrained_cfg` as a tljax `Preprocessing`.

  timm's 'center' mode resizes the shorter side to floor(size / crop_pct)
  and centre-crops, which is tljax's 'shorter' mode; 'squash' at
  crop_pct 1 is a plain resize ('exact'). Geometries tljax cannot
  reproduce are refused rather than approximated, since a silently
  different crop costs accuracy without any error.
  """
  size = cfg.get('input_size', (3, 224, 224))
  if len(size) != 3 or size[1] != size[2]:
    raise PortError(f'{where}: input_size {list(size)} is not a square [3, H, H]; tljax '
                    'preprocesses square inputs only. Pass a config.json with a square '
                    'input_size, or port without it to use the arch default.')
  side = int(size[1])
  crop_pct = cfg.get('crop_pct') or _DEFAULT_CROP_PCT
  crop_mode = cfg.get('crop_mode') or 'center'
  interpolation = cfg.get('interpolation') or 'bilinear'
  if interpolation not in ('bilinear', 'bicubic', 'nearest'):
    raise PortError(f'{where}: interpolation {interpolation!r} is not supported by tljax '
                    "(bilinear, bicubic, nearest); edit config.json's pretrained_cfg.")
  if crop_mode == 'center':
    resize, mode = math.floor(side / crop_pct), 'shorter'
  elif crop_mode == 'squash' and crop_pct == 1:
    resize, mode = side, 'exact'
  else:
    raise PortError(f'{where}: crop_mode {crop_mode!r} with crop_pct {crop_pct} has no tljax '
                    "equivalent ('center' any crop_pct, 'squash' only at crop_pct 1); edit "
                    "config.json's pretrained_cfg to 'center' to accept a centre crop.")
  mean, std = cfg.get('mean') or _IMAGENET_MEAN, cfg.get('std') or _IMAGENET_STD
  if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
    raise PortError(f'{where}: mean {list(mean)} / std {list(std)} must be 3 values (std > 0) '
                    'in 0–1 units.')
  return Preprocessing(input_size=side, resize=resize, resize_mode=mode,
                       mean=tuple(round(255 * m, 6) for m in mean),
                       std=tuple(round(255 * s, 6) for s in std), interpolation=interpolation)


# timm 1.0.31's default pretrained tag per arch and its pretrained_cfg:
# (arch, tag, input side, interpolation, crop_pct, mean, std).
_DEFAULT_CFGS = (
    ('resnet18', 'a1_in1k', 224, 'bicubic', 0.95, _IMAGENET_MEAN, _IMAGENET_STD),
    ('resnet34', 'a1_in1k', 224, 'bicubic', 0.95, _IMAGENET_MEAN, _IMAGENET_STD),
    ('resnet50', 'a1_in1k', 224, 'bicubic', 0.95, _IMAGENET_MEAN, _IMAGENET_STD),
    ('mobilenetv3_large_100', 'ra_in1k', 224, 'bicubic', 0.875, _IMAGENET_MEAN, _IMAGENET_STD),
    ('efficientnet_b0', 'ra_in1k', 224, 'bicubic', 0.875, _IMAGENET_MEAN, _IMAGENET_STD),
    ('convnext_tiny', 'in12k_ft_in1k', 224, 'bicubic', 0.95, _IMAGENET_MEAN, _IMAGENET_STD),
    ('vit_small_patch16_224', 'augreg_in21k_ft_in1k', 224, 'bicubic', 0.9, _INCEPTION_MEAN,
     _INCEPTION_STD),
    ('vit_base_patch16_224', 'augreg2_in21k_ft_in1k', 224, 'bicubic', 0.9, _INCEPTION_MEAN,
     _INCEPTION_STD),
)


def _catalog() -> dict[str, WeightSpec]:
  entries = {}
  for arch, tag, side, interpolation, crop_pct, mean, std in _DEFAULT_CFGS:
    cfg = {'input_size': (3, side, side), 'interpolation': interpolation, 'crop_pct': crop_pct,
           'crop_mode': 'center', 'mean': mean, 'std': std}
    make = lambda variant: WeightSpec(
        source='timm', arch=arch, url=hub_file_url(hub_id(arch, tag), WEIGHTS_FILE),
        filename=WEIGHTS_FILE, sha256=None,
        preprocessing=preprocessing_from_cfg(cfg, f'timm default cfg of {arch}.{tag}'),
        variant=variant)
    entries[f'{arch}:{tag}'] = make(tag)
    entries[arch] = make('')
  return entries


CATALOG: dict[str, WeightSpec] = _catalog()
DEFAULT_TAGS = {arch: tag for arch, tag, *_ in _DEFAULT_CFGS}


def locate(path_or_dir: str | os.PathLike) -> tuple[str, str | None]:
  """(weights file, config.json beside it or None) for a file or a hub snapshot directory."""
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    for name in (WEIGHTS_FILE, PICKLE_FILE):
      if os.path.isfile(os.path.join(path, name)):
        config = os.path.join(path, CONFIG_FILE)
        return os.path.join(path, name), config if os.path.isfile(config) else None
    raise PortError(f'{path} holds neither {WEIGHTS_FILE} nor {PICKLE_FILE}; point --input at '
                    'a timm hub snapshot directory or at the weights file itself.')
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file or directory')
  config = os.path.join(os.path.dirname(path), CONFIG_FILE)
  return path, config if os.path.isfile(config) else None


def _check_header(path: str) -> dict:
  """The safetensors header of `path`, after checking it against the file's size."""
  size = os.path.getsize(path)
  not_st = (f'{path} is not a safetensors file ({{}}); timm hub weights are {WEIGHTS_FILE} '
            f'(a torch pickle goes in a directory as {PICKLE_FILE}, or through '
            '--source=torchvision).')
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise PortError(not_st.format(f'{size} bytes, shorter than the 8-byte header length'))
    (n,) = struct.unpack('<Q', head)
    if n > _MAX_HEADER_BYTES or 8 + n > size:
      raise PortError(not_st.format(f'its first 8 bytes claim a {n}-byte header in a '
                                    f'{size}-byte file'))
    try:
      header = json.loads(f.read(n))
      ends = [int(v['data_offsets'][1]) for k, v in header.items() if k != '__metadata__']
      dtypes = {k: str(v['dtype']) for k, v in header.items() if k != '__metadata__'}
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
      raise PortError(not_st.format(f'its header is not safetensors JSON: {e}')) from None
  claimed = 8 + n + max(ends, default=0)
  if claimed > MAX_FILE_BYTES:
    raise PortError(f'{path}: its header claims {claimed / 2**30:.1f} GiB of tensors, more than '
                    f'the {MAX_FILE_BYTES / 2**30:.0f} GiB any supported arch needs; the file is '
                    'corrupt or not a timm checkpoint.')
  if claimed > size:
    raise PortError(f'{path} is truncated: its header claims {claimed} bytes, the file holds '
                    f'{size}; delete it and download it again.')
  return dtypes


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy; non-float weights are refused."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  dtypes = _check_header(path)
  bad = sorted(f'{k} ({d})' for k, d in dtypes.items()
               if d not in _FLOAT_DTYPES and not k.endswith(_IGNORED_SUFFIX))
  if bad:
    raise PortError(f'{path}: weights must be float16/32/64, found {", ".join(bad[:5])}'
                    f'{f" and {len(bad) - 5} more" if len(bad) > 5 else ""}; re-save the '
                    'checkpoint in float32 (e.g. `model.float()` before saving).')
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise PortError(f'{path} is corrupt ({e}); delete it and download it again.') from None


def load_state_dict(path_or_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """A timm checkpoint (file or hub snapshot directory) as {torch key: numpy array}."""
  path, _ = locate(path_or_dir)
  if path.endswith(('.bin', '.pth', '.pt')):
    state_dict = pickle_reader.load_state_dict(path)
    bad = sorted(k for k, v in state_dict.items()
                 if np.asarray(v).dtype.kind != 'f' and not k.endswith(_IGNORED_SUFFIX))
    if bad:
      raise PortError(f'{path}: weights must be floating point, found non-float '
                      f'{", ".join(bad[:5])}; this is not a timm image-model checkpoint.')
    return state_dict
  return read_safetensors(path)


def read_config(path_or_dir: str | os.PathLike, name: str) -> dict | None:
  """config.json beside the weights (None if absent), checked against `name`'s arch."""
  _, config_path = locate(path_or_dir)
  if config_path is None:
    return None
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise PortError(f'{config_path} is not valid JSON ({e}); fix it or delete it to use the '
                    'arch default preprocessing.') from None
  if not isinstance(config, dict):
    raise PortError(f'{config_path} is not a timm config (a JSON object with "architecture").')
  arch = split_name(name)[0]
  theirs = split_name(str(config.get('architecture', '')))[0]
  if theirs and theirs != arch:
    raise PortError(f'{config_path} says architecture {theirs!r} but --arch is {arch!r}; pass '
                    f'--arch={theirs} or point --input at {arch} weights.')
  _check_model_args(config, arch, config_path)
  return config


# timm's default pooling per arch family; tljax's models pool the same way.
_TOKEN_POOL_ARCHS = ('vit_small_patch16_224', 'vit_base_patch16_224')


def _check_model_args(config: Mapping[str, Any], arch: str, where: str) -> None:
  """Refuses a config.json describing a network other than timm's default `arch`.

  A different pooling, channel count or ViT image size changes tensors or
  the computation; tljax's port would then fail on key names far from the
  cause, or (pooling) silently compute something else.
  """
  args = config.get('model_args') or {}
  pool = config.get('global_pool', args.get('global_pool'))
  expected = 'token' if arch in _TOKEN_POOL_ARCHS else 'avg'
  problems = []
  if pool not in (None, expected):
    problems.append(f'global_pool {pool!r} (tljax ports {arch} with {expected!r})')
  if args.get('in_chans', 3) != 3:
    problems.append(f'in_chans {args["in_chans"]} (tljax ports 3-channel RGB networks)')
  if 'img_size' in args and arch in _TOKEN_POOL_ARCHS:
    size = args['img_size']
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if size != [224, 224]:
      problems.append(f'img_size {size} (tljax ports {arch} at 224; it resamples position '
                      'embeddings for other input sizes itself)')
  if problems:
    raise PortError(f'{where} describes a non-default {arch}: {"; ".join(problems)}; port a '
                    f'checkpoint of timm\'s default {arch}.')


def describe(path_or_dir: str | os.PathLike, name: str) -> dict[str, Any]:
  """Metadata of a timm checkpoint: arch, tag, hub id, preprocessing (and where it came from).

  The preprocessing is config.json's `pretrained_cfg` when the file has one
  beside it; otherwise timm's default cfg for the arch, which
  `preprocessing_source` says so a user can tell the two apart.
  """
  arch, tag = split_name(name)
  config = read_config(path_or_dir, name)
  cfg = (config or {}).get('pretrained_cfg') or {}
  tag = tag or str(cfg.get('tag') or '')
  if cfg:
    _, config_path = locate(path_or_dir)
    preprocessing = preprocessing_from_cfg(cfg, config_path)
    source = f'{CONFIG_FILE} pretrained_cfg'
  elif arch in CATALOG:
    preprocessing = CATALOG[arch].preprocessing
    source = f'timm default cfg of {arch}.{DEFAULT_TAGS[arch]} (no {CONFIG_FILE} beside the file)'
    tag = tag or DEFAULT_TAGS[arch]
  else:
    raise PortError(f'no {CONFIG_FILE} beside {os.fspath(path_or_dir)} and no default cfg for '
                    f'{arch!r}; put the hub config.json next to the weights.')
  num_classes = (config or {}).get('num_classes', cfg.get('num_classes'))
  labels = cfg.get('label_names') or (config or {}).get('label_names')
  return {'arch': arch, 'tag': tag, 'hub_id': hub_id(arch, tag), 'preprocessing': preprocessing,
          'preprocessing_source': source, 'num_classes': num_classes, 'label_names': labels}


def port(path_or_state_dict: str | os.PathLike | Mapping[str, np.ndarray], arch: str,
         num_classes: int | None = 1000, rng: jax.Array | None = None,
         allow_nonfinite: bool = False) -> tuple[dict, list[str]]:
  """Returns ({'params', 'batch_stats'} as numpy arrays, re-initialised leaf paths).

  `arch` is timm's name, optionally with its pretrained tag
  ('resnet50.a1_in1k'). A checkpoint whose head has another class count
  than `num_classes` keeps its trunk; only `head/logits` is re-initialised
  (`num_classes=None` keeps the checkpoint's own head).
  """
  name = os.fspath(arch)
  arch = split_name(name)[0]
  if arch not in CONVERTERS:
    raise ValueError(f'no timm converter for {arch!r}; known: {", ".join(ARCHS)}')
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    what = f'{os.fspath(path_or_state_dict)} (as timm {arch})'
    read_config(path_or_state_dict, name)
    state_dict = load_state_dict(path_or_state_dict)
  else:
    what, state_dict = f'state dict (as timm {arch})', path_or_state_dict
  return strict.port_state_dict(state_dict, CONVERTERS[arch], arch, what=what,
                                num_classes=num_classes, rng=rng, allow_nonfinite=allow_nonfinite)


def from_timm(path_or_dir, arch: str, num_classes: int = 1000, rng: jax.Array | None = None,
              allow_nonfinite: bool = False) -> dict:
  """`{'params', 'batch_stats'}` for `tljax.models.create(arch, num_classes)` (timm names)."""
  return port(path_or_dir, arch, num_classes=num_classes, rng=rng,
              allow_nonfinite=allow_nonfinite)[0]
