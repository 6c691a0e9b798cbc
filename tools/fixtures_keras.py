"""Golden parity fixtures for the Keras ports, produced by `keras.applications` itself.

Run from the repository root (Keras on the JAX backend; either venv has it):

  KERAS_BACKEND=jax .venv/bin/python -m tools.fixtures_keras [--cases inception_v3,...]

For each case it builds the real Keras model (`weights=None`,
`classifier_activation=None`, so the outputs are logits), sets every weight
from the seeded arrays of `tests/reference_weights.py` (BatchNorm statistics
and offsets randomized), and runs it on seeded random inputs at the default
size and at a non-square size. `tests/fixtures/keras/<case>.json` keeps the
manifest (Keras layer order, names and weight shapes), the layer list (to
write files exactly as Keras lays them out), the seeds and Keras' outputs;
for InceptionV3 also a strided slice of the `mixed7` features. No weights
or inputs are stored: the tests rebuild both with numpy alone.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tests import reference_weights  # noqa: E402

OUT_DIR = os.path.join('tests', 'fixtures', 'keras')
WEIGHT_SEED = 0
INPUT_SEED = 1
BATCH = 2
# Features are large (17x17x768 per image at 299); this slice keeps ~2.4k values per image.
FEATURE_STRIDE = (1, 4, 4, 8)
CASES = {
    'inception_v3': dict(arch='inception_v3', keras_model='InceptionV3', kw={},
                         sizes=((299, 299), (139, 181)), features='mixed7'),
    'mobilenet_v1_a1.0': dict(arch='mobilenet_v1', keras_model='MobileNet', kw={'alpha': 1.0},
                              sizes=((224, 224), (193, 257))),
    'mobilenet_v1_a0.5': dict(arch='mobilenet_v1', keras_model='MobileNet', kw={'alpha': 0.5},
                              sizes=((224, 224), (193, 257))),
    'mobilenet_v2_keras_a1.0': dict(arch='mobilenet_v2_keras', keras_model='MobileNetV2',
                                    kw={'alpha': 1.0}, sizes=((224, 224), (193, 257))),
    'mobilenet_v2_keras_a0.35': dict(arch='mobilenet_v2_keras', keras_model='MobileNetV2',
                                     kw={'alpha': 0.35}, sizes=((224, 224), (193, 257))),
}


def keras_model(case: dict, size: tuple[int, int]) -> keras.Model:
  """A fresh session each time, so auto-generated layer names are the same for every size."""
  keras.backend.clear_session()
  return getattr(keras.applications, case['keras_model'])(
      weights=None, classifier_activation=None, input_shape=(*size, 3), **case['kw'])


def role_of(layer, var) -> dict:
  name = var.name
  shape = tuple(var.shape)
  if name in ('kernel', 'depthwise_kernel'):
    if isinstance(layer, keras.layers.DepthwiseConv2D):
      fan_in = shape[0] * shape[1]
    else:
      fan_in = int(np.prod(shape[:-1]))
    return dict(role='kernel', fan_in=int(fan_in))
  roles = {'bias': 'bias', 'gamma': 'bn_scale', 'beta': 'bn_bias', 'moving_mean': 'bn_mean',
           'moving_variance': 'bn_var'}
  if name not in roles:
    raise ValueError(f'no reference role for {layer.name}/{name}')
  return dict(role=roles[name])


def manifest_of(model: keras.Model) -> list[dict]:
  """Weights in Keras' storage order: layers as `model.layers`, weights as the legacy h5 writer."""
  manifest = []
  for layer in model.layers:
    for var in layer.trainable_weights + layer.non_trainable_weights:
      manifest.append({'name': f'{layer.name}/{var.name}', 'shape': list(var.shape),
                       **role_of(layer, var)})
  return manifest


def set_weights(model: keras.Model, manifest: list[dict], weights: dict) -> None:
  entries = iter(manifest)
  for layer in model.layers:
    for var in layer.trainable_weights + layer.non_trainable_weights:
      entry = next(entries)
      assert entry['name'] == f'{layer.name}/{var.name}', (entry['name'], layer.name, var.name)
      var.assign(weights[entry['name']])


def rounded(a: np.ndarray):
  return np.vectorize(lambda v: float(f'{v:.9g}'), otypes=[object])(a).tolist()


def make_fixture(case_name: str) -> dict:
  case = CASES[case_name]
  manifest, layers, outputs = None, None, []
  for i, size in enumerate(case['sizes']):
    model = keras_model(case, size)
    if manifest is None:
      manifest = manifest_of(model)
      layers = [[l.name, type(l).__name__] for l in model.layers]
      weights = reference_weights.build(manifest, WEIGHT_SEED)
    assert [[l.name, type(l).__name__] for l in model.layers] == layers
    set_weights(model, manifest, weights)
    heads = [model.output]
    if case.get('features'):
      heads.append(model.get_layer(case['features']).output)
    probe = keras.Model(model.inputs[0], heads)
    seed = INPUT_SEED + i
    x = reference_weights.random_inputs(seed, (BATCH, *size, 3))
    out = probe(x, training=False)
    out = [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    assert out[0].shape == (BATCH, 1000), out[0].shape
    entry = {'input_seed': seed, 'input_shape': [BATCH, *size, 3], 'logits': rounded(out[0])}
    if case.get('features'):
      f = out[1]
      sl = tuple(slice(None, None, s) for s in FEATURE_STRIDE)
      entry['features'] = {'end_point': case['features'], 'shape': list(f.shape),
                           'stride': list(FEATURE_STRIDE), 'max_abs': float(np.abs(f).max()),
                           'values': rounded(f[sl])}
      print(f'{case_name} {size}: {case["features"]} {f.shape} max|f| {np.abs(f).max():.4g}')
    print(f'{case_name} {size}: max|logits| {np.abs(out[0]).max():.4g}')
    outputs.append(entry)
  return {'case': case_name, 'arch': case['arch'], 'arch_kw': case['kw'], 'source': 'keras',
          'keras_model': case['keras_model'], 'keras': keras.__version__,
          'backend': keras.backend.backend(), 'weight_seed': WEIGHT_SEED, 'layout': 'NHWC',
          'layers': layers, 'manifest': manifest, 'cases': outputs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(CASES),
                      help='comma-separated subset of ' + ', '.join(CASES))
  args = parser.parse_args()
  os.makedirs(OUT_DIR, exist_ok=True)
  for name in args.cases.split(','):
    if name not in CASES:
      raise SystemExit(f'unknown case {name!r}; choose from {", ".join(CASES)}')
    reference_weights.save_fixture(os.path.join(OUT_DIR, f'{name}.json'), **make_fixture(name))


if __name__ == '__main__':
  main()
