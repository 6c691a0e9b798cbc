r"""Seed 000, baseline: a small CNN trained from scratch on 10 Monkey Species.

  python -m tljax.main --config=configs/monkeys_cnn_scratch.py --workdir=workdirs/monkeys_cnn \
      --config.data.root=data/10-monkey-species

Data: the Kaggle archive `10-monkey-species` unpacked under `data.root`
(`training/training/n0..n9`, `validation/validation/n0..n9`, `monkey_labels.txt`);
the validation folder is the test set the seed reports on.

Seed recipe: Adam, lr 1e-5, 100 epochs, batch 16. Seed's result: 45.58% test
accuracy — the number transfer learning (configs/monkeys_resnet34.py) is
measured against.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  c.model.name = 'simple_cnn'
  c.model.head.hidden = (256,)
  c.model.head.dropout = 0.5
  c.preprocessing = 'torchvision'
  c.data.source = 'folder'
  c.data.root = 'data/10-monkey-species'
  c.data.train_split = 'training'
  c.data.val_split = 'validation'
  c.data.label_file = 'monkey_labels.txt'
  c.batch_size = 16
  c.phases = (phase('scratch', epochs=100, trainable='all', optimizer='adam', lr=1e-5, eps=1e-8,
                    bn='train'),)
  c.checkpoint.every_steps = 500
  return finalize(c, config_args(arg))
