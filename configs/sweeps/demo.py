r"""The demo's question: what do ImageNet weights buy on 100 digit images?

  make demo   # ports the weights, classifies two photos, then runs:
  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/demo.py \
      --workdir=workdirs/default
  python -m tljax.sweep --config=configs/default.py:tiny --sweep=configs/sweeps/demo.py \
      --workdir=/tmp/demo_tiny --seeds=2                                   # test mode

Two arms, three seeds each; the transfer arm's rows are its two phases
(head-only, then fine-tuned), read from the same runs:

  scratch    EfficientNet-Lite0 from random init, every layer trained (BN statistics
             re-estimated per epoch: 'precise BN'), 20 epochs
  transfer   the recipe of configs/default.py: the real ImageNet weights, a new head on
             the frozen trunk, then every layer at 1/20 of the head's LR, BN frozen
"""

from tljax.config import phase


def get_sweep(arg: str = ''):
  del arg
  scratch = (phase('scratch', epochs=20, trainable='all', optimizer='adam', lr=1e-3, bn='train',
                   precise_bn=8, schedule='cosine'),)
  return {
      'arms': {
          'scratch': {'pretrained.source': 'none', 'phases': scratch},
          'transfer': {},
      },
      'seeds': (0, 1, 2),
      'baseline': 'scratch',
      'per_phase': True,
  }
