"""Layout conversions shared by the torch-family converters, with key accounting.

`StateDictReader` hands out tensors by name and remembers which were taken,
so a converter that forgets a tensor (or asks for one that is absent) ends
in one `PortError` listing every problem instead of a half-ported model.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from tljax.porting.merge import PortError, unflatten


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch OIHW (depthwise: C,1,kh,kw) → Flax HWIO (depthwise: kh,kw,1,C)."""
  if w.ndim != 4:
    raise PortError(f'expected a 4-D conv weight, got shape {w.shape}')
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch (out, in) → Flax Dense (in, out)."""
  if w.ndim != 2:
    raise PortError(f'expected a 2-D linear weight, got shape {w.shape}')
  return np.ascontiguousarray(w.T)


class StateDictReader:
  """Builds Flax variables from a torch-style state dict, strictly."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], *, ignore_suffixes=('num_batches_tracked',),
               what: str = 'state dict'):
    self._sd = {k: np.asarray(v) for k, v in state_dict.items()}
    self._used: set[str] = set()
    self._missing: list[str] = []
    self._ignore = tuple(ignore_suffixes)
    self._what = what
    self.flat: dict[str, np.ndarray] = {}

  def take(self, key: str) -> np.ndarray | None:
    if key not in self._sd:
      self._missing.append(key)
      return None
    self._used.add(key)
    return self._sd[key].astype(np.float32)

  def _put(self, path: str, value):
    if value is not None:
      self.flat[path] = value

  def conv(self, torch_prefix: str, flax_path: str, bias: bool = False):
    w = self.take(f'{torch_prefix}.weight')
    self._put(f'params/{flax_path}/kernel', None if w is None else conv_kernel(w))
    if bias:
      self._put(f'params/{flax_path}/bias', self.take(f'{torch_prefix}.bias'))

  def linear(self, torch_prefix: str, flax_path: str):
    w = self.take(f'{torch_prefix}.weight')
    self._put(f'params/{flax_path}/kernel', None if w is None else linear_kernel(w))
    self._put(f'params/{flax_path}/bias', self.take(f'{torch_prefix}.bias'))

  def bn(self, torch_prefix: str, flax_path: str):
    self._put(f'params/{flax_path}/scale', self.take(f'{torch_prefix}.weight'))
    self._put(f'params/{flax_path}/bias', self.take(f'{torch_prefix}.bias'))
    self._put(f'batch_stats/{flax_path}/mean', self.take(f'{torch_prefix}.running_mean'))
    self._put(f'batch_stats/{flax_path}/var', self.take(f'{torch_prefix}.running_var'))

  def finish(self) -> dict:
    """Returns {'params', 'batch_stats'}; raises listing missing and unused tensors."""
    unused = sorted(k for k in self._sd if k not in self._used and not k.endswith(self._ignore))
    if self._missing or unused:
      lines = [f'{self._what} does not match the architecture:']
      if self._missing:
        lines.append(f'  missing ({len(self._missing)}):')
        lines.extend(f'    {k}' for k in self._missing)
      if unused:
        lines.append(f'  unexpected ({len(unused)}):')
        lines.extend(f'    {k}  {tuple(self._sd[k].shape)}' for k in unused)
      raise PortError('\n'.join(lines))
    return unflatten(self.flat)
