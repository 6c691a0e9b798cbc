r"""Seed 002: tf_flowers (5 classes) on a frozen MobileNetV2 feature extractor, 5 epochs.

  python -m tljax.port --source=keras --arch=mobilenet_v2_keras --variant=notop --download \
      --output=weights/mobilenet_v2_keras_notop
  python -m tljax.main --config=configs/flowers_mobilenet_v2.py --workdir=workdirs/flowers

Data: tfds `tf_flowers` (3,670 photos), 80% train / 20% test as the seed splits it
(the test part doubles as the validation set here).

Seed recipe: TF-Hub MobileNetV2 (ImageNet) feature vector, frozen; one Dense(5) on the
pooled 1280 features; Adam (lr 1e-3), sparse softmax cross-entropy from logits;
224x224 inputs, no augmentation, 5 epochs. Seed's result: 92% test accuracy.
The Keras-applications MobileNetV2 stands in for the TF-Hub module (the same
network and weights family, inputs scaled to [-1, 1]); without augmentation the
trunk's features are computed once and only the head is trained on them.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = base_config()
  c.model.name = 'mobilenet_v2_keras'
  c.model.head.update(dict(pool='avg', hidden=(), dropout=0.0))
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/mobilenet_v2_keras_notop'
  c.input_size = 224
  c.data.source = 'tfds'
  c.data.name = 'tf_flowers'
  c.data.train_split = 'train[:80%]'
  c.data.val_split = 'train[80%:]'
  c.batch_size = 32
  c.phases = (phase('head', epochs=5, trainable='head', optimizer='adam', lr=1e-3, augment=False),)
  return finalize(c, config_args(arg))
