r"""Launch training, evaluation or prediction from a config file.

  python -m tljax.main --config=configs/default.py --workdir=workdirs/default
  python -m tljax.main --config=configs/monkeys_resnet34.py --workdir=W --config.phases[1].epochs=5
  python -m tljax.main --config=configs/default.py:tiny --workdir=/tmp/w     # test mode
  python -m tljax.main --config=... --workdir=W --mode=eval --config.eval.split=test
  python -m tljax.main --config=... --workdir=W --mode=predict --config.predict.images="('a.jpg',)"

Re-running the same train command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (`get_config()`).',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, plots and summaries.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')


def _parse(argv: list[str]) -> list[str]:
  """absl flag parsing, with unknown config keys reported as a one-line fix, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _usage(str(e))
  except (AttributeError, KeyError) as e:
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    _usage(f'unknown config key in {bad}: {e}. Every --config.<path> must name an existing '
           'field of the config file (the config is locked; see its get_config()).')
  except (TypeError, ValueError) as e:
    _usage(f'invalid config override: {e}')
  return []


def _usage(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage(f'unexpected arguments {argv[1:]}; options are --config, --workdir, --mode, --config.*')
  if _CONFIG.value is None or not FLAGS.workdir:
    _usage('need --config=configs/<name>.py and --workdir=DIR')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  config = _CONFIG.value
  from tljax.config import validate
  try:
    validate(config)
  except ValueError as e:
    _usage(str(e))
  if FLAGS.mode == 'train':
    from tljax import train
    try:
      train.train_and_evaluate(config, FLAGS.workdir)
    except train.Preempted as e:
      print(str(e), file=sys.stderr)
      sys.exit(143)
  elif FLAGS.mode == 'eval':
    from tljax import evaluate
    evaluate.evaluate(config, FLAGS.workdir)
  else:
    import os
    from tljax import predict
    if not config.predict.images:
      _usage("--mode=predict needs --config.predict.images=\"('a.jpg', 'b.jpg')\"")
    sys.exit(predict.run(os.path.join(FLAGS.workdir, 'export'), list(config.predict.images),
                         config.predict.top_k))


def run() -> None:
  app.run(main, flags_parser=_parse)


if __name__ == '__main__':
  run()
