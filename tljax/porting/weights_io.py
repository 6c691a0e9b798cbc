"""Ported-weights directories: `weights.safetensors` + `metadata.json`.

Safetensors holds arrays only (no pickle, no code), and the JSON says how
to use them: architecture, source file checksum, preprocessing and labels.
Every reader error names the file and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from tljax.porting.merge import PortError, check_finite, flatten, unflatten

WEIGHTS_FILE = 'weights.safetensors'
METADATA_FILE = 'metadata.json'
REQUIRED_METADATA = ('arch', 'source', 'num_classes', 'preprocessing')


def sha256_of(path: str) -> str:
  """SHA-256 of a file, read in 1 MiB blocks: what metadata and export manifests record."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def save_weights(directory: str, variables: dict, metadata: dict[str, Any]) -> None:
  from safetensors.numpy import save_file
  missing = [k for k in REQUIRED_METADATA if k not in metadata]
  if missing:
    raise ValueError(f'metadata lacks {missing}')
  os.makedirs(directory, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(variables).items()}
  tmp = os.path.join(directory, WEIGHTS_FILE + '.tmp')
  save_file(arrays, tmp)
  os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=2, sort_keys=True)


def load_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise PortError(f'{path} not found: {directory} is not a ported-weights directory '
                    '(create one with `python -m tljax.port ...`).')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise PortError(f'{path} is not valid JSON ({e}); re-run `python -m tljax.port`.') from e
  missing = [k for k in REQUIRED_METADATA if k not in meta]
  if missing:
    raise PortError(f'{path} lacks {missing}; re-run `python -m tljax.port`.')
  return meta


def load_weights(directory: str, allow_nonfinite: bool = False) -> tuple[dict, dict]:
  """Returns `({'params': ..., 'batch_stats': ...}, metadata)`.

  The port refused NaN/inf weights, so finding some here means the file was
  changed since (or the port opted in): refused unless `allow_nonfinite=True`.
  """
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  meta = load_metadata(directory)
  path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise PortError(f'{path} not found; re-run `python -m tljax.port`.')
  try:
    arrays = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise PortError(f'{path} is corrupt or truncated ({e}); re-run `python -m tljax.port`.') from e
  variables = unflatten(arrays)
  check_finite(variables, path, allow_nonfinite=allow_nonfinite,
               opt_in='allow_nonfinite=True to load_weights')
  return variables, meta
