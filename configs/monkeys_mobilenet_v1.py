r"""Seed 004: 10 Monkey Species on a frozen Keras MobileNet (v1), dense layers trained.

  python -m tljax.port --source=keras --arch=mobilenet_v1 --variant=notop --download \
      --output=weights/mobilenet_v1_notop
  python -m tljax.main --config=configs/monkeys_mobilenet_v1.py --workdir=workdirs/monkeys_mnv1 \
      --config.data.root=data/10-monkey-species

Seed recipe: pretrained MobileNet with every weight frozen except the new top, "Fully
Connected (FC) or Dense Layers with a final output of 10". The seed gives neither the
layer widths nor the optimizer and reports no accuracy; the values here follow the
course notebook it comes from (global average pool → Dense(1024, relu) → Dense(1024,
relu) → Dense(512, relu) → Dense(10, softmax); RMSprop 1e-3; 224x224; rotation, flip
augmentation; batch 16; 5 epochs). No seed number to reproduce: compare with
configs/monkeys_resnet34.py's head phase.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  c.model.name = 'mobilenet_v1'
  c.model.head.update(dict(pool='avg', hidden=(1024, 1024, 512), activation='relu', dropout=0.0))
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/mobilenet_v1_notop'
  c.input_size = 224
  c.data.source = 'folder'
  c.data.root = 'data/10-monkey-species'
  c.data.train_split = 'training'
  c.data.val_split = 'validation'
  c.data.label_file = 'monkey_labels.txt'
  c.augment.update(dict(random_resized_crop=False, flip=True, rotation=45.0))
  c.batch_size = 16
  c.phases = (phase('head', epochs=5, trainable='head', optimizer='rmsprop', lr=1e-3,
                    momentum=0.0, bn='frozen'),)
  return finalize(c, config_args(arg))
