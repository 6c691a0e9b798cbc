r"""Launch training, evaluation or prediction from a config file.

  python -m tljax.main --config=configs/default.py --workdir=workdirs/default
  python -m tljax.main --config=configs/monkeys.py:model=resnet34 --workdir=W --config.phases[1].epochs=5
  python -m tljax.main --config=configs/default.py:tiny --workdir=/tmp/w     # test mode
  python -m tljax.main --config=... --workdir=W --mode=eval --config.eval.split=test
  python -m tljax.main --config=... --workdir=W --mode=predict --config.predict.images="('a.jpg',)"
  python -m tljax.main --config=... --workdir=W --mode=lr_find    # lr range test, in W/lr_find/

Re-running the same train command resumes from the workdir's latest checkpoint.

Multi-host (TPU pod slices, multi-node GPU, or several CPU processes): every
host runs the same command with `--distributed`; `jax.distributed.initialize`
connects them (gloo collectives on CPU) before any device is touched. The
global `batch_size` is split over all processes' devices, eval outputs are
gathered so every host computes the same metrics, process 0 writes the
workdir's files and all hosts take part in orbax checkpointing, so `--workdir`
must be one shared filesystem path (NFS, GCS) for all of them. A 2-host job:

  host0$ python -m tljax.main --config=C --workdir=/shared/W --distributed \
           --coordinator_address=host0:12345 --num_processes=2 --process_id=0
  host1$ python -m tljax.main --config=C --workdir=/shared/W --distributed \
           --coordinator_address=host0:12345 --num_processes=2 --process_id=1

On Cloud TPU, SLURM, Open MPI or Kubernetes JobSets, `--distributed` alone is
enough (JAX detects the cluster); JAX_COORDINATOR_ADDRESS also replaces the flag.
"""

from __future__ import annotations

import errno
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tljax import preemption

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (`get_config()`).',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, plots and summaries.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'lr_find'], 'What to do.')
flags.DEFINE_bool('distributed', False, 'Multi-host run: call jax.distributed.initialize() first.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed); '
                    'default: JAX_COORDINATOR_ADDRESS or cluster auto-detection.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (with --distributed).')
flags.DEFINE_bool('tune_malloc', True, 'CPU runs only: restart the process once on an allocator '
                  'that keeps freed memory (tcmalloc where installed, else glibc tunables and a '
                  'huge-block cache; TLJAX_MALLOC chooses) so steps stop paying page faults; see '
                  'tljax.cpu_backend.allocator. GPU/TPU runs and TLJAX_OPS=xla are never '
                  'restarted.')


def _parse(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad config file or override is one line naming it and the fix."""
  overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
  try:
    return FLAGS(argv)
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError):
      _usage(_config_file_error(argv))
    _usage(_last_line(e))
  except OSError:
    _usage(_config_file_error(argv))
  except IndexError as e:
    _usage(f'config override {overrides} indexes past the end of a tuple ({e}); e.g. '
           '--config.phases[i] needs i < the number of phases in the config file.')
  except (AttributeError, KeyError) as e:
    _usage(f'unknown config key in {overrides}: {e}. Every --config.<path> must name an existing '
           'field of the config file (the config is locked; see its get_config()).')
  except (TypeError, ValueError) as e:
    _usage(f'invalid config: {e}')
  return []


def _usage(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _last_line(e: Exception) -> str:
  """The innermost message of an error that ml_collections wrapped around a traceback."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return re.sub(r'^\w+Error: ', '', lines[-1]) if lines else type(e).__name__


def _config_file_error(argv: list[str]) -> str:
  spec = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), '')
  path = spec.split(':', 1)[0]
  if not os.path.isfile(path):
    return (f'config file {path!r} does not exist; pass --config=configs/<recipe>.py[:tiny] '
            f'(recipes: {", ".join(sorted(_recipes()))}).')
  return f'config file {path!r} could not be loaded; run `python {path}` to see why.'


def _recipes() -> list[str]:
  here = os.path.join(os.getcwd(), 'configs')
  return [f for f in os.listdir(here) if f.endswith('.py')] if os.path.isdir(here) else []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage(f'unexpected arguments {argv[1:]}; options are --config, --workdir, --mode, '
           '--distributed (+ --coordinator_address, --num_processes, --process_id), --config.*')
  if FLAGS['config'].value is None or not FLAGS.workdir:
    _usage('need --config=configs/<name>.py and --workdir=DIR')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  logging.get_absl_handler().addFilter(_BackgroundErrors(FLAGS.workdir))
  from tljax.config import validate
  try:
    config = _CONFIG.value
    validate(config)
  except OSError:   # ml_collections defers a missing config file's error to first use
    _usage(_config_file_error(sys.argv))
  except ValueError as e:
    _usage(str(e))
  from tljax import ops
  try:
    ops.requested()
    if FLAGS.tune_malloc:
      from tljax.cpu_backend import allocator
      allocator.malloc_choice()
  except ValueError as e:
    _usage(str(e))
  if FLAGS.tune_malloc:
    _restart_tuned()
  _init_distributed()
  _log_backend()
  try:
    _run_mode(config)
  except OSError as e:
    _fail(_os_error(e))
  except ValueError as e:
    code = re.search(r"os_error_code='(\d+)'", str(e))   # tensorstore's OS errors (orbax)
    if code:
      _fail(_os_error(OSError(int(code.group(1)), os.strerror(int(code.group(1))))))
    if os.environ.get('TLJAX_TRACEBACK') == '1':
      raise
    # tljax raises ValueError for bad inputs (data, weights, sizes) with the fix in the message.
    _usage(f'{_last_line(e)} (TLJAX_TRACEBACK=1 shows where it was raised)')


def _restart_tuned() -> None:
  """Restarts a CPU run once under the allocator settings; returns at once anywhere else."""
  from tljax.cpu_backend import allocator
  with preemption.held_across_exec():
    allocator.restart_with_tuned_allocator()


def _log_backend() -> None:
  """One line, from process 0, saying what the CPU backend changed (nothing off CPU)."""
  import jax
  from tljax import ops
  if ops.active_backend() == 'cpu' and jax.process_index() == 0:
    from tljax.cpu_backend import allocator
    print(allocator.describe(), file=sys.stderr, flush=True)


def _run_mode(config) -> None:
  from tljax.checkpoint import CheckpointError
  preemption.check_early()
  if FLAGS.mode == 'train':
    from tljax import train
    try:
      train.train_and_evaluate(config, FLAGS.workdir)
    except train.Preempted as e:
      _stop_preempted(e)
    except (train.Diverged, train.workdir_lock.WorkdirInUse, CheckpointError) as e:
      _fail(str(e))
  elif FLAGS.mode == 'eval':
    from tljax import evaluate
    try:
      evaluate.evaluate(config, FLAGS.workdir)
    except (CheckpointError, FileNotFoundError) as e:
      _fail(str(e))
  elif FLAGS.mode == 'lr_find':
    from tljax import lr_find, workdir_lock
    try:
      lr_find.find(config, FLAGS.workdir)
    except workdir_lock.WorkdirInUse as e:
      _fail(str(e))
  else:
    from tljax import predict
    if not config.predict.images:
      _usage("--mode=predict needs --config.predict.images=\"('a.jpg', 'b.jpg')\"")
    sys.exit(predict.run(os.path.join(FLAGS.workdir, 'export'), list(config.predict.images),
                         config.predict.top_k, tta=config.eval.tta))


class _BackgroundErrors(pylogging.Filter):
  """Moves orbax's and asyncio's error tracebacks from stderr to `<workdir>/errors.log`.

  A failed checkpoint write (a full disk) makes every background writer log
  its own traceback, hundreds in all; the loop re-raises the first failure
  and `main` prints it as one line, so the rest is kept for whoever digs.
  """

  def __init__(self, workdir: str):
    super().__init__()
    self._path = os.path.join(workdir, 'errors.log')

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.levelno < pylogging.ERROR or not (
        '/orbax/' in record.pathname or record.name.startswith('asyncio')):
      return True
    try:
      with open(self._path, 'a') as f:
        f.write(pylogging.Formatter().format(record) + '\n')
    except OSError:
      pass
    return False


def _stop_preempted(e: Exception) -> None:
  """Exit 143 without interpreter teardown: a SIGTERM may have interrupted XLA mid-call, and
  anything worth keeping (the checkpoint) is already on disk when `Preempted` arrives here."""
  print(str(e), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(143)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _os_error(e: OSError) -> str:
  where = e.filename or FLAGS.workdir
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f'no space left on the device holding {where}; free space or use another --workdir '
            '(earlier checkpoints are intact; re-running the same command resumes).')
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return (f'cannot write {where} ({e.strerror}); choose a writable --workdir.')
  return f'{e.strerror or e} ({where})'


def _init_distributed() -> None:
  """Joins the multi-host job before anything touches devices (device lists would be local)."""
  explicit = {k: FLAGS[k].value for k in ('coordinator_address', 'num_processes', 'process_id')
              if FLAGS[k].value is not None}
  if not FLAGS.distributed:
    if explicit:
      _usage(f'{sorted(explicit)} only apply with --distributed; add it or drop them.')
    return
  import jax
  jax.distributed.initialize(**explicit)
  print(f'process {jax.process_index()} of {jax.process_count()}: '
        f'{jax.local_device_count()} local / {jax.device_count()} global devices', flush=True)


def run() -> None:
  preemption.stop_on_sigterm()   # the training loop takes over SIGTERM when it starts
  try:
    app.run(main, flags_parser=_parse)
  except preemption.Preempted as e:
    _stop_preempted(e)


if __name__ == '__main__':
  run()
