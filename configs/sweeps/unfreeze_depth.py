r"""How much of the network to fine-tune after the head: none, the last block(s), or all?

  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/unfreeze_depth.py \
      --workdir=workdirs/unfreeze_depth
  python -m tljax.sweep --config=configs/default.py:tiny \
      --sweep=configs/sweeps/unfreeze_depth.py --workdir=/tmp/unfreeze_tiny --seeds=1  # test mode

The default recipe with the second phase's `trainable` rule varied
(tljax.optim.TRAINABLE_GRAMMAR: `top:N` is the head plus the last N backbone
blocks). 'head' keeps training the head alone for the same 10 epochs, so
every arm sees the same number of steps.
"""


def get_sweep(arg: str = ''):
  del arg
  return {
      'arms': {
          'head': {'phases[1].trainable': 'head'},
          'top1': {'phases[1].trainable': 'head+top:1'},
          'top3': {'phases[1].trainable': 'head+top:3'},
          'all': {'phases[1].trainable': 'all'},
      },
      'seeds': (0, 1, 2),
      'baseline': 'head',
  }
