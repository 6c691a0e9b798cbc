r"""Seed 003: Animals-10 dogs vs horses (500 each) on InceptionV3 cut at mixed7, sigmoid head.

  python -m tljax.port --source=keras --arch=inception_v3 --variant=notop --download \
      --output=weights/inception_v3_notop
  python -m tljax.main --config=configs/dog_horse_inception_mixed7.py --workdir=workdirs/dog_horse \
      --config.data.root=data/animals10/raw-img

Data: the Kaggle Animals-10 archive (`raw-img/<italian class name>/*`); the first 500
valid images of `cane` (dog) and `cavallo` (horse) in sorted order, 20% of them held
out (stratified) for validation.

Seed recipe: InceptionV3 weights up to mixed7, frozen; Flatten → Dense(relu) →
Dropout(0.2) → Dense(1, sigmoid). The seed does not state the Dense width, the
optimizer, the input size or the epochs; the values here are those of the
TensorFlow-in-Practice notebook it follows (Dense(1024), RMSprop 1e-4, 150x150,
ImageDataGenerator-style augmentation, 20 epochs). Seed's results: 94.33% train /
92.00% validation accuracy (losses 0.2262 / 0.3355).
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  c.model.name = 'inception_v3'
  c.model.arch_kw = ml_collections.ConfigDict(dict(cut='mixed7'))
  c.model.head.update(dict(pool='flatten', hidden=(1024,), activation='relu', dropout=0.2))
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/inception_v3_notop'
  c.pretrained.dont_load = (r'^(params|batch_stats)/head/', r'/backbone/mixed(8|9|10)/')
  c.input_size = 150
  c.loss.kind = 'sigmoid'
  c.data.source = 'folder'
  c.data.root = 'data/animals10/raw-img'
  c.data.classes = ('cane', 'cavallo')
  c.data.max_per_class = 500
  c.data.val_fraction = 0.2
  c.augment.update(dict(random_resized_crop=False, flip=True, rotation=40.0, zoom=0.2))
  c.batch_size = 20
  c.phases = (phase('head', epochs=20, trainable='head', optimizer='rmsprop', lr=1e-4,
                    momentum=0.0, bn='frozen'),)
  return finalize(c, config_args(arg))
