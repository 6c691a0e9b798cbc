"""Orbax checkpoints: periodic (for resuming) and best-by-validation (for using).

A resumable checkpoint holds everything the run's future depends on: params,
batch statistics, optimizer state, step, base PRNG key and the data position
(phase, epoch, step within the epoch) plus host bookkeeping in a JSON item.
The optimizer state's structure depends on the phase, so `restore_latest`
reads the JSON first and asks the caller for the matching target.

Orbax writes to a temporary directory and renames it when complete, so a
`kill -9` mid-save leaves the previous checkpoint as the latest. Files
damaged afterwards (disk, copy, a human) are caught on restore: the damaged
step is moved aside with a warning and the one before it is used.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _warn(mngr, step: int, error: Exception) -> None:
  msg = (f'checkpoint {mngr.directory}/{step} is unreadable ({type(error).__name__}: '
         f'{str(error)[:200]}); falling back to the previous one.')
  logging.warning(msg)
  print('WARNING: ' + msg, flush=True)


def _host(tree):
  import jax
  return jax.tree.map(np.asarray, tree)


class Checkpointer:
  """`<workdir>/checkpoints` (latest `keep`) and `<workdir>/best` (highest validation accuracy)."""

  def __init__(self, workdir: str, *, keep: int = 2, best: bool = True, async_save: bool = True):
    self.workdir = workdir
    self._latest = _manager(os.path.join(workdir, 'checkpoints'), keep, async_save)
    self._best = _manager(os.path.join(workdir, 'best'), 1, async_save) if best else None

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """`state`: {'model': {params, batch_stats}, 'opt_state', 'step', 'rng'} (host arrays)."""
    if step in self._latest.all_steps():
      return
    self._latest.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(_host(state['model'])),
        train=ocp.args.StandardSave(_host({k: state[k] for k in ('opt_state', 'step', 'rng')})),
        meta=ocp.args.JsonSave(dict(meta))))

  def save_best(self, step: int, model_vars: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    if self._best is None or step in self._best.all_steps():
      return
    self._best.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(_host(model_vars)), meta=ocp.args.JsonSave(dict(meta))))

  def best_meta(self) -> dict | None:
    if self._best is None or self._best.latest_step() is None:
      return None
    step = self._best.latest_step()
    return dict(self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore_latest(self, target: Callable[[dict], Mapping[str, Any]]) -> tuple[dict, dict] | None:
    """(state, meta) of the newest readable checkpoint, or None when there is none.

    `target(meta)` returns abstract (or example) trees for 'model' and
    'train' so that optimizer states come back with their NamedTuple types.
    """
    unreadable = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        meta = dict(self._latest.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        tgt = target(meta)
        restored = self._latest.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(tgt['model']),
            train=ocp.args.StandardRestore(tgt['train'])))
      except Exception as e:  # pylint: disable=broad-except
        _warn(self._latest, step, e)
        unreadable.append((step, e))
        continue
      for bad, _ in unreadable:
        self._quarantine(self._latest, bad)
      return {'model': restored.model, **restored.train}, meta
    if unreadable:
      step, e = unreadable[-1]
      raise RuntimeError(f'no readable checkpoint under {self.workdir}/checkpoints (oldest, step '
                         f'{step}: {type(e).__name__}: {e}). Delete that directory to start over.')
    return None

  def restore_model(self, which: str = 'latest', target: Mapping | None = None) -> tuple[dict, dict]:
    """Model variables and meta for evaluation: from the latest or the best checkpoint."""
    mngr = self._best if which == 'best' else self._latest
    if mngr is None or mngr.latest_step() is None:
      raise FileNotFoundError(f'no {which} checkpoint under {self.workdir}; train first '
                              f'(python -m tljax.main --config=... --workdir={self.workdir}).')
    errors = []
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.model, dict(restored.meta)
      except Exception as e:  # pylint: disable=broad-except
        _warn(mngr, step, e)
        errors.append(f'step {step}: {type(e).__name__}: {e}')
    raise RuntimeError(f'every {which} checkpoint under {self.workdir} is unreadable: {errors}')

  def _quarantine(self, mngr: ocp.CheckpointManager, step: int) -> None:
    """Moves an unreadable step aside so resumed training can write that step again."""
    src = os.path.join(str(mngr.directory), str(step))
    dst = f'{src}.corrupt'
    if os.path.exists(dst):
      shutil.rmtree(dst)
    if os.path.exists(src):
      os.rename(src, dst)
      logging.warning('moved unreadable checkpoint %s to %s', src, dst)
    mngr.reload()

  def wait(self) -> None:
    self._latest.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()
