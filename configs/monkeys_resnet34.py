r"""Seed 000, transfer: ImageNet ResNet34, new head on the frozen trunk, then everything.

  python -m tljax.port --source=torchvision --arch=resnet34 --download --output=weights/resnet34
  python -m tljax.main --config=configs/monkeys_resnet34.py --workdir=workdirs/monkeys_resnet34 \
      --config.data.root=data/10-monkey-species

Seed recipe (PyTorch): fc replaced by a 10-way Linear; phase 1 trains it alone, phase 2
unfreezes every layer; Adam, lr 1e-5, batch 16, 100 epochs each. Seed's results:
95.58% test accuracy after the head phase, 98.38% after fine-tuning.

Differences on purpose: the head phase runs the trunk's BatchNorm on its running
statistics (PyTorch's `model.train()` would update them although the convolutions are
frozen) and trains on 10 pre-drawn augmented views per image whose trunk features are
computed once (`cache_views=10`; set `--config.phases[0].cache_views=0` for fresh
augmentation every epoch, about 10x slower). Fine-tuning trains BatchNorm as the seed
did; `--config.phases[1].bn=frozen` gives the Keras recipe.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  c.model.name = 'resnet34'
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/resnet34'
  c.data.source = 'folder'
  c.data.root = 'data/10-monkey-species'
  c.data.train_split = 'training'
  c.data.val_split = 'validation'
  c.data.label_file = 'monkey_labels.txt'
  c.batch_size = 16
  c.phases = (
      phase('head', epochs=100, trainable='head', optimizer='adam', lr=1e-5, eps=1e-8,
            bn='frozen', cache_views=10),
      phase('fine_tune', epochs=100, trainable='all', optimizer='adam', lr=1e-5, eps=1e-8,
            bn='train'),
  )
  c.checkpoint.every_steps = 500
  return finalize(c, config_args(arg))
