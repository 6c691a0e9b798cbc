r"""BatchNorm during fine-tuning: frozen running statistics, or batch statistics and updates?

  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/bn_policy.py \
      --workdir=workdirs/bn_policy
  python -m tljax.sweep --config=configs/default.py:tiny --sweep=configs/sweeps/bn_policy.py \
      --workdir=/tmp/bn_tiny --seeds=1                                     # test mode

The default recipe (head on the frozen trunk, then every layer at 1e-4) with
the fine-tuning phase's BatchNorm policy as the only difference. With 16
images per batch and 100 training images, 'train' estimates the statistics
from small batches and moves the ImageNet running averages toward them.
"""


def get_sweep(arg: str = ''):
  del arg
  return {
      'arms': {
          'bn_frozen': {'phases[1].bn': 'frozen'},
          'bn_train': {'phases[1].bn': 'train'},
      },
      'seeds': (0, 1, 2),
      'baseline': 'bn_frozen',
  }
