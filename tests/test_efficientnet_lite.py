"""EfficientNet-Lite: parity with `efficientnet_lite_pytorch`, with the REAL ImageNet weights.

The golden fixtures were produced by the reference implementation itself
(`tools/fixtures_efficientnet.py`); here the shipped .pth is read with the
torch-free reader and run through the Flax port on the same inputs.
"""

import functools
import hashlib
import json
import os

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests import reference_weights
from tljax import models
from tljax.labels import imagenet1k
from tljax.models import efficientnet_lite as lite
from tljax.porting import from_efficientnet_lite
from tljax.porting.efficientnet_lite import CATALOG, convert, shipped_weights_path
from tljax.porting.merge import PortError, flatten, unflatten
from tljax.porting.pickle_reader import load_state_dict
from tljax.predict import prepare

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'efficientnet_lite')
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def tolerance(logits):
  return 1e-4 * max(1.0, float(np.abs(logits).max()))


def load(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def real_state_dict():
  return load_state_dict(shipped_weights_path())


@pytest.fixture(scope='module')
def lite0():
  model = models.create('efficientnet_lite0', 1000)
  return model, jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_real_weights_match_reference_on_photos(real_state_dict, lite0):
  fixture = load('real_photos.json')
  spec = CATALOG['efficientnet_lite0'].preprocessing
  assert spec.to_json() == fixture['preprocessing']
  x = np.stack([prepare(Image.fromarray(getattr(skimage.data, c['photo'])()), spec)
                for c in fixture['cases']])
  for xi, case in zip(x, fixture['cases']):
    digest = hashlib.sha256(np.ascontiguousarray(xi, np.float32).tobytes()).hexdigest()
    assert digest == case['input_sha256'], (
        f"{case['photo']}: host preprocessing no longer reproduces the reference input; "
        'regenerate with `.venv-ref/bin/python -m tools.fixtures_efficientnet --only real`')
  variables = from_efficientnet_lite(real_state_dict)
  got = np.asarray(lite0[1](variables, x))
  want = np.array([c['logits'] for c in fixture['cases']], np.float32)
  assert np.abs(got - want).max() <= tolerance(want)
  names = imagenet1k()
  for row, case in zip(got, fixture['cases']):
    top5 = [int(i) for i in np.argsort(-row)[:5]]
    assert top5 == case['top5'], case['photo']
    assert [names[i] for i in top5] == case['top5_labels']
  top1 = {c['photo']: int(np.argmax(row)) for c, row in zip(fixture['cases'], got)}
  assert top1['chelsea'] in CAT_CLASSES
  assert top1['coffee'] == ESPRESSO and names[ESPRESSO] == 'espresso'


def test_port_from_path_equals_port_from_state_dict(real_state_dict):
  from_path = flatten(from_efficientnet_lite(shipped_weights_path()))
  from_dict = flatten(from_efficientnet_lite(real_state_dict))
  assert from_path.keys() == from_dict.keys()
  assert all(np.array_equal(from_path[k], from_dict[k]) for k in from_path)
  assert from_path['params/head/logits/kernel'].shape == (1280, 1000)


def test_catalog_checksum_is_the_shipped_file():
  spec = CATALOG['efficientnet_lite0']
  path = shipped_weights_path()
  assert os.path.basename(path) == spec.filename
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert digest == spec.sha256
  assert digest.startswith(spec.filename.rsplit('-', 1)[1].split('.')[0])
  assert (spec.preprocessing.input_size, spec.preprocessing.resize) == (224, 256)
  assert tuple(spec.preprocessing.mean) == (127.0,) * 3
  assert tuple(spec.preprocessing.std) == (128.0,) * 3
  assert spec.preprocessing.interpolation == 'bicubic'


# Default resolutions of two scalings, the reference's static pads (computed for 240) on a 224
# input, and TF-style dynamic pads on a non-square odd size. lite1/3/4 run in the live test.
# (Random lite3/lite4 amplify float32 rounding to ~1e-3 in torch itself: live, in float64.)
RANDOM_CASES = ('lite0', 'lite2', 'lite1_static240_at224', 'lite0_dynamic_193x257')


def random_case(case):
  fixture = load(f'random_{case}.json')
  state_dict = reference_weights.build(fixture['manifest'], fixture['weight_seed'])
  model = models.create(fixture['arch'], 1000, **fixture['arch_kw'])
  return fixture, state_dict, model


@pytest.mark.parametrize('case', RANDOM_CASES)
def test_random_weights_match_reference(case):
  fixture, state_dict, model = random_case(case)
  variables = convert(state_dict, fixture['arch'])
  for c in fixture['cases']:
    x = reference_weights.random_inputs(c['input_seed'], c['input_shape'])
    got = np.asarray(jax.jit(model.apply)(variables, x))
    want = np.array(c['logits'], np.float32)
    assert np.abs(got - want).max() <= tolerance(want), case


def test_static_pads_differ_from_dynamic_in_the_static_case():
  """lite1's pads fixed for 240 differ from a 224 input's own, so that fixture tests them."""
  differ = []
  static, dynamic = (120, 120), (112, 112)
  for spec in lite.arch_facts('efficientnet_lite1')['blocks']:
    differ.append(lite._pads(static, spec.kernel, spec.stride) !=
                  lite._pads(dynamic, spec.kernel, spec.stride))
    static, dynamic = lite._out_size(static, spec.stride), lite._out_size(dynamic, spec.stride)
  assert any(differ)


def test_strict_port_lists_missing_and_unexpected(real_state_dict):
  broken = dict(real_state_dict)
  del broken['_blocks.3._bn1.running_var']
  broken['_blocks.16._bn1.weight'] = np.ones(3, np.float32)
  with pytest.raises(PortError) as e:
    from_efficientnet_lite(broken)
  assert '_blocks.3._bn1.running_var' in str(e.value)
  assert '_blocks.16._bn1.weight' in str(e.value)
  with pytest.raises(PortError, match=r'missing \(75\)'):
    from_efficientnet_lite(real_state_dict, 'efficientnet_lite1')
  with pytest.raises(ValueError, match='unknown EfficientNet-Lite arch'):
    from_efficientnet_lite(real_state_dict, 'efficientnet_b0')


def test_wrong_scaling_with_matching_names_is_a_shape_error():
  _, lite1_state_dict, _ = random_case('lite1_static240_at224')  # lite1, lite2: both 21 blocks
  with pytest.raises(PortError, match='wrong shape for efficientnet_lite2') as e:
    from_efficientnet_lite(lite1_state_dict, 'efficientnet_lite2')
  assert 'params/backbone/blocks_20/project_conv/kernel' in str(e.value)


def test_new_head_keeps_trunk_and_reinitialises_logits(real_state_dict):
  pretrained = flatten(from_efficientnet_lite(real_state_dict))
  ported = flatten(from_efficientnet_lite(real_state_dict, num_classes=5, rng=jax.random.key(3)))
  assert ported.keys() == pretrained.keys()
  assert ported['params/head/logits/kernel'].shape == (1280, 5)
  assert np.all(np.asarray(ported['params/head/logits/bias']) == 0)
  for k, v in pretrained.items():
    if '/head/' not in k:
      assert np.array_equal(np.asarray(ported[k]), v), k


def test_scalings_match_published_sizes():
  counts = {}
  for name in ('efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2',
               'efficientnet_lite3', 'efficientnet_lite4'):
    size = models.input_size(name)
    shapes = jax.eval_shape(models.create(name, 1000).init, jax.random.key(0),
                            np.zeros((1, size, size, 3), np.float32))
    counts[name] = (size, len(lite.arch_facts(name)['blocks']),
                    sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])))
  # Resolutions and parameter counts of the EfficientNet-Lite release (4.7M ... 13.0M).
  assert counts == {
      'efficientnet_lite0': (224, 16, 4652008), 'efficientnet_lite1': (240, 21, 5416680),
      'efficientnet_lite2': (260, 21, 6092072), 'efficientnet_lite3': (280, 24, 8197096),
      'efficientnet_lite4': (300, 30, 13006568)}


def random_variables(model, x, seed=0):
  """Seeded numpy weights in the model's tree: `model.init` compiles for ~30 s on a loaded CPU."""
  roles = {'kernel': 'kernel', 'bias': 'bias', 'scale': 'bn_scale', 'mean': 'bn_mean',
           'var': 'bn_var'}
  rng = np.random.default_rng(seed)
  shapes = flatten(jax.eval_shape(model.init, jax.random.key(0), x))
  flat = {k: reference_weights.random_array(rng, v.shape, roles[k.rsplit('/', 1)[1]],
                                            int(np.prod(v.shape[:-1])))
          for k, v in sorted(shapes.items())}
  return unflatten(flat)


def test_tiny_variant_drop_connect_and_frozen_batch_norm():
  model = models.create('efficientnet_lite_tiny', 3)
  x = reference_weights.random_inputs(0, (4, 64, 64, 3))
  variables = random_variables(model, x)
  eval_features = jax.jit(lambda v: model.apply(v, x, method=model.features))(variables)
  assert eval_features.shape == (4, 2, 2, 64)

  @functools.partial(jax.jit, static_argnums=1)
  def train_features(key, bn_train):
    return model.apply(variables, x, train=True, bn_train=bn_train, rngs={'dropout': key},
                       method=model.features, mutable=['batch_stats'])

  train = lambda k: train_features(jax.random.key(k), True)
  (a, stats), (b, _) = train(1), train(2)
  assert not np.allclose(a, b)  # drop-connect is the backbone's only randomness
  old = flatten(variables['batch_stats'])
  assert all(not np.allclose(v, old[k]) for k, v in flatten(stats['batch_stats']).items()
             if k.endswith('var'))
  # A frozen backbone (bn_train=False) uses running statistics and no drop-connect.
  frozen = [train_features(jax.random.key(k), False)[0] for k in (1, 2)]
  assert np.array_equal(frozen[0], frozen[1])
  assert np.allclose(frozen[0], eval_features, atol=1e-4)


def test_tf_same_padding_is_asymmetric_on_stride_two():
  assert lite.tf_same_padding(224, 3, 2) == (0, 1)
  assert lite.tf_same_padding(15, 5, 2) == (2, 2)
  assert lite.tf_same_padding(14, 5, 2) == (1, 2)
  assert lite.tf_same_padding(7, 3, 1) == (1, 1)


@pytest.mark.reference
@pytest.mark.parametrize('arch', ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite3',
                                  'efficientnet_lite4'])
def test_live_reference(arch):
  """Reference in-process: lite0 with the real weights on a photo (float32); the other
  scalings with random weights in float64 on both sides, because random BN statistics make
  deep nets amplify float32 rounding (torch float32 vs float64 differ by ~8e-4 on lite4)."""
  import torch
  from efficientnet_lite_pytorch import EfficientNet
  from tools.fixtures_efficientnet import manifest_of
  size = models.input_size(arch)
  if arch == 'efficientnet_lite0':
    ref = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=shipped_weights_path())
    x = prepare(Image.fromarray(skimage.data.chelsea()), CATALOG[arch].preprocessing)[None]
    variables, dtype = from_efficientnet_lite(shipped_weights_path()), np.float32
  else:
    ref = EfficientNet.from_name(arch.replace('_', '-'))
    state_dict = reference_weights.build(manifest_of(ref), 7)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    x = reference_weights.random_inputs(8, (1, size, size, 3)).astype(np.float64)
    variables, dtype = from_efficientnet_lite(state_dict, arch), np.float64
    ref = ref.double()
  with torch.no_grad():
    want = ref.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  with jax.enable_x64(dtype == np.float64):
    model = models.create(arch, 1000, dtype=dtype)
    variables = jax.tree.map(lambda a: np.asarray(a, dtype), variables)
    got = np.asarray(jax.jit(model.apply)(variables, x))
  assert np.abs(got - want).max() <= tolerance(want)
  assert list(np.argsort(-got[0])[:5]) == list(np.argsort(-want[0])[:5])
