r"""The demo's transfer recipe as one tljax pipeline (no scratch variant), for the replication
against a plain PyTorch loop (issue 16 item 8; `torch_lite0.py` is the other side).

  python -m tljax.main --config=experiments/replication/tljax_lite0.py --workdir=/tmp/repl/tljax_s0 \
      --config.seed=0

Starts from configs/default.py's get_config() (of the tljax tree being run: the file is found
next to the imported `tljax` package, so a private worktree runs its own copy) and keeps its data
(digits, 10 train images per class, val/test carved 25%/25% with split_seed 0), model
(EfficientNet-Lite0, shipped ImageNet weights, head dropout 0.2), 128 px input, batch 16 and both
phases, with the user's recipe: no augmentation in either phase (the demo's fine-tuning phase
augments with random resized crops; `ft_aug=on` restores that), head Adam 2e-3 x 25 epochs,
then every layer Adam 1e-4 cosine x 10 epochs with BatchNorm frozen.

Arguments (`--config=...tljax_lite0.py:key=value,...`), one setting at a time for bisection:
  ft_aug=off|on      fine-tuning phase augmentation (demo: on)
  eps=1e-7|1e-8      Adam eps of both phases (tljax default 1e-7, torch 1e-8)
  drop_connect=follow_bn|when_trained   the fine-tuning phase's drop-connect policy
                     (tljax default follow_bn: off under bn='frozen'; torch keeps it on)
"""

import importlib.util
import os

import tljax
from tljax.config import config_args, finalize, phase


def _demo():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tljax.__file__))),
                      'configs', 'default.py')
  spec = importlib.util.spec_from_file_location('_demo_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ''):
  args = config_args(arg, ft_aug=('off', 'on'), eps=('1e-7', '1e-8'),
                     drop_connect=('follow_bn', 'when_trained'))
  c = _demo().get_config()
  c.unlock()
  eps = float(args['eps'])
  c.phases = (
      phase('head_only', epochs=25, trainable='head', optimizer='adam', lr=2e-3, eps=eps,
            augment=False),
      phase('fine_tuned', epochs=10, trainable='all', optimizer='adam', lr=1e-4, eps=eps,
            bn='frozen', schedule='cosine', augment=args['ft_aug'] == 'on',
            drop_connect=args['drop_connect']),
  )
  c.log.plots = False
  c.log.tensorboard = False
  c.log.progress = False
  c.checkpoint.keep = 1
  return finalize(c, args)
