"""The Keras 3 (JAX backend) side: keras.applications models through Keras' own API.

`predict_on_batch` and `train_on_batch` are what Keras users call (both
jit-compiled on the JAX backend); the head step compiles the model with the
base `trainable=False`, which Keras runs with frozen BN statistics, as
tljax's head phase. Only architectures keras.applications has are measured
(no ResNet34, MobileNetV3 differs from torchvision's, no EfficientNet-Lite).
"""

from __future__ import annotations

import os

import numpy as np

from experiments.timing import guarded, measure

KERAS_MODELS = {'resnet50': 'ResNet50', 'mobilenet_v2': 'MobileNetV2',
                'inception_v3': 'InceptionV3'}


def run_model(name: str, *, batch: int, size: int, dtype: str, modes_to_run, iters: int,
              warmup: int, num_classes: int = 1000, on_result=None) -> dict:
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  import keras
  if keras.backend.backend() != 'jax':
    raise RuntimeError(f'Keras backend is {keras.backend.backend()!r}; set KERAS_BACKEND=jax '
                       'before anything imports keras.')
  if name not in KERAS_MODELS:
    raise KeyError(f'no keras.applications model matches {name!r} (compared: '
                   f'{", ".join(KERAS_MODELS)}; Keras\' MobileNetV3 differs from torchvision\'s)')
  keras.mixed_precision.set_global_policy('mixed_bfloat16' if dtype == 'bfloat16' else 'float32')
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, (batch,)).astype(np.int32)
  results = {}
  for mode in modes_to_run:
    if mode == 'cached_head_step':
      continue
    print(f'  keras {mode}', flush=True)
    results[mode] = guarded(f'keras {mode}', lambda: _measure(
        keras, name, mode, images, labels, size, num_classes, iters, warmup))
    if on_result:
      on_result('keras', mode, results[mode])
  return {'keras': results}


def _measure(keras, name, mode, images, labels, size, num_classes, iters, warmup):
  keras.utils.clear_session()
  app = getattr(keras.applications, KERAS_MODELS[name])
  base = app(include_top=False, weights=None, input_shape=(size, size, 3), pooling='avg')
  outputs = keras.layers.Dense(num_classes, dtype='float32', name='logits')(base.output)
  model = keras.Model(base.input, outputs)
  if mode == 'inference':
    return measure(lambda: model.predict_on_batch(images), lambda _: None, iters=iters,
                   warmup=warmup)
  base.trainable = mode == 'full_step'
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return measure(lambda: model.train_on_batch(images, labels), lambda _: None, iters=iters,
                 warmup=warmup)
