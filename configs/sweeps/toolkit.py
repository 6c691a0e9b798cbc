r"""What each small-data tool buys, on the demo recipe (real EfficientNet-Lite0, digits).

  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/toolkit.py:imbalance \
      --workdir=workdirs/toolkit_imbalance --workers=2
  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/toolkit.py:tta \
      --workdir=workdirs/toolkit_tta --workers=2
  python -m tljax.sweep --config=configs/default.py --sweep=configs/sweeps/toolkit.py:ema \
      --workdir=workdirs/toolkit_ema --workers=2
  python -m tljax.sweep --config=configs/default.py:tiny --sweep=configs/sweeps/toolkit.py:tta \
      --workdir=/tmp/toolkit_tiny --seeds=1                                # test mode
  python experiments/toolkit_report.py --sweep_dir=workdirs/toolkit_imbalance --rare=3

  imbalance  20 images per class drawn, then long-tailed by class index with ratio 10
             (20, 15, 12, 9, 7, 6, 4, 3, 3, 2 per class): plain loss vs
             loss.class_weights='balanced' vs data.sampler='balanced'
  tta        the recipe with the cache at 146 px (so crops differ from the centre view):
             single view vs five_crop vs flip (mirrored digits are other glyphs: a
             control that TTA is not free)
  ema        no EMA vs ema_decay=0.95 in both phases

Every run also fits a temperature on its validation logits; the table's "ECE after T"
column is the test ECE at that temperature, next to the test ECE before it.
"""

STUDIES = {
    'imbalance': {
        'common': {'data.examples_per_class': 20, 'data.imbalance_ratio': 10.0},
        'arms': {'plain': {}, 'class_weights': {'loss.class_weights': 'balanced'},
                 'sampler': {'data.sampler': 'balanced'}},
    },
    'tta': {
        'common': {'load_size': 146},
        'arms': {'single_view': {}, 'five_crop': {'eval.tta': 'five_crop'},
                 'flip': {'eval.tta': 'flip'}},
    },
    'ema': {
        'common': {},
        'arms': {'no_ema': {}, 'ema': {'phases[0].ema_decay': 0.95,
                                       'phases[1].ema_decay': 0.95}},
    },
}


def get_sweep(arg: str = ''):
  if arg not in STUDIES:
    raise ValueError(f'configs/sweeps/toolkit.py takes one of {", ".join(STUDIES)} '
                     f'(e.g. toolkit.py:imbalance), got {arg!r}')
  study = STUDIES[arg]
  return {
      'arms': {name: {**study['common'], **arm} for name, arm in study['arms'].items()},
      'seeds': (0, 1, 2),
      'baseline': next(iter(study['arms'])),
  }
