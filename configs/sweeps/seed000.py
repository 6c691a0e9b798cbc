r"""Seed 000's question, with intervals: when does transfer beat training from scratch?

  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/seed000.py \
      --workdir=workdirs/seed000
  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/seed000.py:all \
      --workdir=workdirs/seed000   # adds every training image (~90 per class; hours on a CPU)
  python -m tljax.sweep --config=configs/default.py:tiny --sweep=configs/sweeps/seed000.py \
      --workdir=/tmp/seed000_tiny --seeds=1                                # test mode

Four ways of training EfficientNet-Lite0 on the digits, crossed with the
number of training images per class (2, 5, 10, 20; `:all` adds 0 = every
training image, ~90 per class):

  scratch               random init, every layer, 20 epochs (configs/sweeps/demo.py's arm)
  head_only             ImageNet weights frozen, new head, 25 epochs
  head_then_fine_tune   the default recipe: that head, then every layer at 1e-4 for 10 epochs
  fine_tune_from_start  every layer at 1e-4 from a fresh head, 35 epochs (the same number
                        of epochs as the two-phase recipe, with no head warm-up)

The few-shot draw follows the seed, so the interval includes which images
were drawn; `few_shot_seed` would hold it fixed.
"""

from tljax.config import phase

SHOTS = (2, 5, 10, 20)


def get_sweep(arg: str = ''):
  if arg not in ('', 'all'):
    raise ValueError(f'seed000.py takes no argument or :all, not {arg!r}')
  scratch = (phase('scratch', epochs=20, trainable='all', optimizer='adam', lr=1e-3, bn='train',
                   precise_bn=8, schedule='cosine'),)
  head = (phase('head_only', epochs=25, trainable='head', optimizer='adam', lr=2e-3,
                augment=False),)
  from_start = (phase('fine_tuned', epochs=35, trainable='all', optimizer='adam', lr=1e-4,
                      bn='frozen', schedule='cosine'),)
  return {
      'arms': {
          'scratch': {'pretrained.source': 'none', 'phases': scratch},
          'head_only': {'phases': head},
          'head_then_fine_tune': {},
          'fine_tune_from_start': {'phases': from_start},
      },
      'grid': {'data.examples_per_class': SHOTS + ((0,) if arg == 'all' else ())},
      'labels': {'data.examples_per_class': {0: 'all'}},
      'seeds': (0, 1, 2),
      'baseline': 'scratch',
  }
