"""Orbax checkpoints: periodic (for resuming) and best-by-validation (for using).

A resumable checkpoint holds everything the run's future depends on: params,
batch statistics, optimizer state, step, base PRNG key and the data position
(phase, epoch, step within the epoch) plus host bookkeeping in a JSON item.
The optimizer state's structure depends on the phase, so `restore_latest`
reads the JSON first and asks the caller for the matching target.

Orbax writes to a temporary directory and renames it when complete, so a
`kill -9` mid-save leaves the previous checkpoint as the latest. Files
damaged afterwards (disk, copy, a human) are caught on restore: orbax and
tensorstore reject broken structure, but array bytes carry no checksum, so a
flipped bit in them would restore silently. Every checkpoint therefore also
holds a 'digest' item (sha256 of each array's dtype, shape and bytes, keyed
by tree path, and of the meta JSON), computed from the host arrays when the
save is issued and written in the same atomic step directory. A step that
fails to read or whose digest differs is moved aside to `<step>.corrupt`
with one warning line and the step before it is used; when none is usable a
`CheckpointError` says so in one line. Checkpoints written before digests
existed restore unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging as pylogging
import os
import re
import sys
import traceback
from typing import Any, Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

DIGEST = 'digest'
_FIX = 'delete that directory to start over, or use a fresh --workdir'


class CheckpointError(RuntimeError):
  """No usable checkpoint; the message names the directory and the fix, fit for one CLI line."""


class _DigestMismatch(Exception):
  pass


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  # Each manager's barriers get their own key prefix: on several hosts the best manager's
  # background commit and the latest manager's next save otherwise meet at one barrier key
  # ("Barrier ...set_value_start is already ongoing").
  prefix = 'tljax_' + os.path.basename(os.path.normpath(directory))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _host(tree):
  import jax
  return jax.tree.map(np.asarray, tree)


# ---- digests ----

def _key_name(key) -> str:
  """One path element, spelled alike for dict keys, NamedTuple fields and sequence indices,
  so a tree restored as dicts or lists still matches the one that was saved."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _array_entry(x) -> list | None:
  """[dtype, shape, sha256 of dtype+shape+bytes]; None for an array this host cannot read whole."""
  if hasattr(x, 'is_fully_addressable') and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return None
    x = x.addressable_data(0)
  x = np.asarray(x, order='C')
  if x.dtype.byteorder == '>':
    x = x.astype(x.dtype.newbyteorder('<'))
  head = [x.dtype.name, list(x.shape)]
  h = hashlib.sha256(json.dumps(head).encode())
  h.update(x.reshape(-1).view(np.uint8))
  return head + [h.hexdigest()]


def _tree_digest(tree) -> dict[str, list | None]:
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): _array_entry(x) for path, x in leaves}


def _meta_digest(meta: Mapping[str, Any]) -> str | None:
  try:
    text = json.dumps(meta, sort_keys=True)
  except (TypeError, ValueError):
    return None
  return hashlib.sha256(text.encode()).hexdigest()


def _self_hash(digest: Mapping[str, Any]) -> str:
  body = {k: v for k, v in digest.items() if k != 'self'}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest(items: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
  """The 'digest' item; 'self' covers the rest, so a flip inside it is caught too
  (a damaged path or dtype there would otherwise only skip that array's check)."""
  digest = {'version': 1, 'hash': 'sha256', 'meta': _meta_digest(meta),
            'arrays': {name: _tree_digest(tree) for name, tree in items.items()}}
  digest['self'] = _self_hash(digest)
  return digest


def _verify(digest: Mapping[str, Any] | None, meta: Mapping[str, Any],
            items: Mapping[str, Any]) -> tuple[int, int]:
  """(items checked, arrays left unchecked); raises `_DigestMismatch` on any difference.

  Only leaves whose dtype and shape match the saved ones are compared: a
  restore target of another dtype casts on purpose, which is no damage.
  """
  if digest is None:
    return 0, 0
  if digest.get('self') != _self_hash(digest):
    raise _DigestMismatch('its digest item is damaged')
  bad, checked, unchecked = [], 0, 0
  if digest.get('meta') is not None:
    checked += 1
    if _meta_digest(meta) != digest['meta']:
      bad.append('meta')
  for name, tree in items.items():
    saved = digest['arrays'].get(name, {})
    for path, entry in _tree_digest(tree).items():
      want = saved.get(path)
      if entry is None or want is None or entry[:2] != want[:2]:
        unchecked += 1
        continue
      checked += 1
      if entry[2] != want[2]:
        bad.append(f'{name}/{path}')
  if bad:
    raise _DigestMismatch(f'{len(bad)} of {checked} items differ from the digest saved with '
                          f'them, e.g. {bad[0]}')
  logging.info('checkpoint digest: %d items verified', checked)
  if unchecked:
    logging.warning('checkpoint digest: %d restored arrays not verified (not in the digest, or '
                    'the restore target changed their dtype or shape)', unchecked)
  return checked, unchecked


# ---- orbax's abandoned reads and writes ----
#
# A failing array read or write (a corrupt file, a full disk) makes orbax's
# `asyncio.gather` raise at once while its sibling reads or writes are still in
# flight, and orbax's `run_sync` then closes the
# private event loop it ran on. The siblings complete later, and each way
# they do prints a report: tensorstore calls `loop.call_soon_threadsafe` on
# the closed loop and hands the RuntimeError to `PyErr_WriteUnraisable`
# ("Event loop is closed" tracebacks), and tasks or gathers that failed
# without anyone left to look are logged by asyncio as "... exception was
# never retrieved" when collected. Nothing awaits those results and the
# failure itself reaches the caller, so from the first checkpointer on exactly
# these reports go to the debug log instead of stderr (a write's siblings can
# finish before the failure surfaces at the next save); everything else still
# reaches the previous hook and handlers.

_STATUS = re.compile(r'[A-Z][A-Z_]+: ')   # tensorstore errors start with an absl status code


def _is_closed_loop_callback(unraisable) -> bool:
  e = unraisable.exc_value
  if unraisable.object is not None or not isinstance(e, RuntimeError):
    return False
  if str(e) != 'Event loop is closed' or unraisable.exc_traceback is None:
    return False
  return any(f.name == 'call_soon_threadsafe'
             for f in traceback.extract_tb(unraisable.exc_traceback))


class _AbandonedReadFilter(pylogging.Filter):
  """Drops asyncio's "exception was never retrieved" records for tensorstore or orbax errors."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if not str(record.msg).split('\n', 1)[0].endswith('exception was never retrieved'):
      return True
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if not (_STATUS.match(str(error)) or
            any(f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in f.filename for f in frames)):
      return True
    logging.debug('dropped an abandoned checkpoint read: %s', error)
    return False


def _quiet_abandoned_io() -> None:
  if not getattr(sys.unraisablehook, 'tljax_quiets_abandoned_io', False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if _is_closed_loop_callback(unraisable):
        logging.debug('dropped a late tensorstore callback of a failed checkpoint read or write')
      else:
        previous(unraisable)

    hook.tljax_quiets_abandoned_io = True
    sys.unraisablehook = hook
  asyncio_logger = pylogging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadFilter())


def _reason(error: Exception) -> str:
  """The error in one line, without tensorstore's spec dumps, driver chain and repeated paths."""
  text = ' '.join(str(error).split())
  if isinstance(error, _DigestMismatch):
    return text
  text = text.split(' [tensorstore_spec')[0]
  text = re.sub(r'Error opening "\w+" driver: ', '', text)
  text = re.sub(r' (in OCDBT database at|of) local file "[^"]*"', '', text)
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= 200 else text[:197] + '...'


class Checkpointer:
  """`<workdir>/checkpoints` (latest `keep`) and `<workdir>/best` (highest validation accuracy)."""

  def __init__(self, workdir: str, *, keep: int = 2, best: bool = True, async_save: bool = True):
    self.workdir = workdir
    _quiet_abandoned_io()
    self._async = async_save
    self._latest = _manager(os.path.join(workdir, 'checkpoints'), keep, async_save)
    self._best = _manager(os.path.join(workdir, 'best'), 1, async_save) if best else None
    self._phase_best = None

  def _phase_best_manager(self, create: bool) -> ocp.CheckpointManager | None:
    """`<workdir>/phase_best`: the current phase's best weights, for early stopping's restore
    (made on first use: runs without early stopping never have it)."""
    path = os.path.join(self.workdir, 'phase_best')
    if self._phase_best is None and (create or os.path.isdir(path)):
      self._phase_best = _manager(path, 1, self._async)
    return self._phase_best

  def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """`state`: {'model': {params, batch_stats}, 'opt_state', 'step', 'rng'} (host arrays)."""
    if step in self._latest.all_steps():
      return
    items = {'model': _host(state['model']),
             'train': _host({k: state[k] for k in ('opt_state', 'step', 'rng')})}
    self._latest.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(items['model']),
        train=ocp.args.StandardSave(items['train']),
        meta=ocp.args.JsonSave(dict(meta)),
        **{DIGEST: ocp.args.JsonSave(_digest(items, meta))}))

  def save_best(self, step: int, model_vars: Mapping[str, Any], meta: Mapping[str, Any],
                *, phase: bool = False) -> None:
    """The best model so far: of the run (`best/`), or with `phase=True` of the current phase
    (`phase_best/`, what early stopping restores)."""
    mngr = self._phase_best_manager(create=True) if phase else self._best
    if mngr is None or step in mngr.all_steps():
      return
    model = _host(model_vars)
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(dict(meta)),
        **{DIGEST: ocp.args.JsonSave(_digest({'model': model}, meta))}))

  def best_meta(self) -> dict | None:
    if self._best is None or self._best.latest_step() is None:
      return None
    step = self._best.latest_step()
    return dict(self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore_latest(self, target: Callable[[dict], Mapping[str, Any]]) -> tuple[dict, dict] | None:
    """(state, meta) of the newest usable checkpoint, or None when there is none.

    `target(meta)` returns abstract (or example) trees for 'model' and
    'train' so that optimizer states come back with their NamedTuple types.
    Raises `CheckpointError` when checkpoints exist but none is usable.
    """
    bad = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        meta, digest = self._read_json(self._latest, step)
        tgt = target(meta)
        restored = self._latest.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(tgt['model']),
            train=ocp.args.StandardRestore(tgt['train'])))
        _verify(digest, meta, {'model': restored.model, 'train': restored.train})
      except Exception as e:  # pylint: disable=broad-except
        bad.append(self._failed(self._latest, step, e))
        continue
      self._set_aside(self._latest, bad, step)
      return {'model': restored.model, **restored.train}, meta
    if bad:
      raise CheckpointError(f'no usable checkpoint under {self._latest.directory} '
                            f'({"; ".join(f"step {s}: {r}" for s, r in bad)}); {_FIX}.')
    return None

  def restore_model(self, which: str = 'latest', target: Mapping | None = None) -> tuple[dict, dict]:
    """Model variables and meta: from the latest, the best or the phase's best checkpoint."""
    mngr = {'best': self._best, 'latest': self._latest,
            'phase_best': self._phase_best_manager(create=False)}[which]
    if mngr is None or mngr.latest_step() is None:
      raise FileNotFoundError(f'no {which} checkpoint under {self.workdir}; train first '
                              f'(python -m tljax.main --config=... --workdir={self.workdir}).')
    bad = []
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        meta, digest = self._read_json(mngr, step)
        model = mngr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target))).model
        _verify(digest, meta, {'model': model})
      except Exception as e:  # pylint: disable=broad-except
        bad.append(self._failed(mngr, step, e))
        continue
      self._set_aside(mngr, bad, step)
      return model, meta
    other = ('evaluate the latest one instead (--config.eval.checkpoint=latest) or ' if
             which == 'best' else '')
    raise CheckpointError(f'no usable {which} checkpoint under {mngr.directory} '
                          f'({"; ".join(f"step {s}: {r}" for s, r in bad)}); {other}{_FIX}.')

  @staticmethod
  def _read_json(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict | None]:
    """(meta, digest); the digest is None for checkpoints written before digests existed."""
    has_digest = (mngr.directory / str(step) / DIGEST).exists()
    items = {'meta': ocp.args.JsonRestore()}
    if has_digest:
      items[DIGEST] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return dict(restored['meta']), (dict(restored[DIGEST]) if has_digest else None)

  @staticmethod
  def _failed(mngr: ocp.CheckpointManager, step: int, error: Exception) -> tuple[int, str]:
    logging.info('checkpoint %s/%s is unusable: %r', mngr.directory, step, error)
    return step, _reason(error)

  def _set_aside(self, mngr: ocp.CheckpointManager, bad: list[tuple[int, str]], good: int) -> None:
    """Quarantines the unusable steps newer than `good`, one warning line each."""
    for step, reason in bad:
      dst = self._quarantine(mngr, step)
      msg = (f'checkpoint {mngr.directory}/{step} is unreadable ({reason}); '
             f'{f"moved it to {os.path.basename(dst)}, " if dst else ""}using step {good} instead.')
      logging.info(msg)
      print('WARNING: ' + msg, flush=True)

  def _quarantine(self, mngr: ocp.CheckpointManager, step: int) -> str | None:
    """Moves an unusable step aside so resumed training can write that step again.

    Never deletes: an older `<step>.corrupt` keeps its name and this one gets
    a numbered suffix. None when the step is gone already (another process of
    a multi-host job moved it first).
    """
    src = os.path.join(str(mngr.directory), str(step))
    dst, n = f'{src}.corrupt', 0
    while os.path.exists(dst):
      n += 1
      dst = f'{src}.corrupt.{n}'
    try:
      os.rename(src, dst)
    except FileNotFoundError:
      dst = None
    mngr.reload()
    return dst

  def _managers(self) -> list[ocp.CheckpointManager]:
    return [m for m in (self._latest, self._best, self._phase_best) if m is not None]

  def wait(self) -> None:
    for m in self._managers():
      m.wait_until_finished()

  def close(self) -> None:
    for m in self._managers():
      m.close()
