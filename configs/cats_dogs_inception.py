r"""Seed 001: cats vs dogs (2,000 train / 1,000 val) on a frozen Keras InceptionV3, binary head.

  python -m tljax.port --source=keras --arch=inception_v3 --variant=notop --download \
      --output=weights/inception_v3_notop
  python -m tljax.main --config=configs/cats_dogs_inception.py --workdir=workdirs/cats_dogs
  python -m tljax.main --config=configs/cats_dogs_inception.py:cut=mixed7 \
      --workdir=workdirs/cats_dogs7

Data: tfds `cats_vs_dogs` (prepare it once on a connected machine; it contains corrupt
JPEGs, which are skipped and counted), first 2,000 images for training and the next 1,000
for validation, as in the seed.

Seed recipe (TensorFlow in Practice): every InceptionV3 layer frozen, a new top of
Flatten → Dense(1024, relu) → Dropout(0.2) → Dense(1, sigmoid), binary cross-entropy,
RMSprop lr 1e-4, 150x150 inputs, batches of 20, ImageDataGenerator augmentation
(rotation 40°, zoom 0.2, horizontal flip; shifts and shear are not implemented here).
The whole network (`cut=mixed10`, the default) is average-pooled before the top (its
3x3x2048 map at 150 px); `:cut=mixed7` cuts the network at mixed7 and flattens its
7x7x768 map, the variant the seed reports as better. Seed's results: 94% validation
accuracy (whole network), 96% (cut at mixed7). Epochs are not given in the seed; 20 here.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase

ARGS = dict(cut=('mixed10', 'mixed7'))


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = config_args(arg, **ARGS)
  c = base_config()
  c.model.name = 'inception_v3'
  c.model.head.update(dict(pool='avg', hidden=(1024,), activation='relu', dropout=0.2))
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/inception_v3_notop'
  c.input_size = 150
  c.loss.kind = 'sigmoid'
  c.data.source = 'tfds'
  c.data.name = 'cats_vs_dogs'
  c.data.train_split = 'train[:2000]'
  c.data.val_split = 'train[2000:3000]'
  c.augment.update(dict(random_resized_crop=False, flip=True, rotation=40.0, zoom=0.2))
  c.batch_size = 20
  c.phases = (phase('head', epochs=20, trainable='head', optimizer='rmsprop', lr=1e-4,
                    momentum=0.0, bn='frozen'),)
  if args['cut'] == 'mixed7':
    c.model.arch_kw = ml_collections.ConfigDict(dict(cut='mixed7'))
    c.model.head.pool = 'flatten'
    c.pretrained.dont_load = (r'^(params|batch_stats)/head/', r'/backbone/mixed(8|9|10)/')
  return finalize(c, args)
