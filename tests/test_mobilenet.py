"""MobileNetV2 / V3-Small / V3-Large: structure, parameter counts and parity with torchvision.

Golden fixtures (`tests/fixtures/torchvision/mobilenet_*.json`) were produced
by real torchvision (`tools/fixtures_torchvision_mobilenet.py`); here the same
seeded state dict is rebuilt with numpy, ported through
`tljax.porting.from_torchvision` and compared. The `reference` tests redo it
live against torchvision in-process.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_weights
from tljax import models
from tljax.models import mobilenet
from tljax.porting import from_torchvision
from tljax.porting.convert import StateDictReader
from tljax.porting.merge import PortError
from tljax.porting.torchvision_mobilenet import CATALOG_ENTRIES, convert

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'torchvision')
ARCHS = ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large')


def _fixture(arch: str) -> dict:
  return reference_weights.load_fixture(os.path.join(FIXTURES, f'{arch}.json'))


def _param_count(name: str, **arch_kw) -> int:
  model = models.create(name, 1000, **arch_kw)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


# torchvision 0.29.1: `sum(p.numel() for p in model.parameters())` (the first
# three are also the `num_params` of torchvision's weight enums).
@pytest.mark.parametrize('name, kw, count', [
    ('mobilenet_v2', {}, 3_504_872),
    ('mobilenet_v3_small', {}, 2_542_856),
    ('mobilenet_v3_large', {}, 5_483_032),
    ('mobilenet_v2', {'width_mult': 1.4}, 6_108_776),
    ('mobilenet_v3_large', {'width_mult': 0.75}, 3_377_576),
])
def test_param_counts_equal_torchvision(name, kw, count):
  assert _param_count(name, **kw) == count


def test_make_divisible_matches_torchvision():
  # torchvision.models._utils._make_divisible(v, 8) for these v.
  values = (32 * 0.35, 1280 * 1.4, 16 * 0.75, 96 * 0.5, 11.0, 3.0, 1280 * 0.75)
  assert [mobilenet.make_divisible(v) for v in values] == [16, 1792, 16, 48, 16, 8, 960]


@pytest.mark.parametrize('name, channels', [('mobilenet_v2', 1280), ('mobilenet_v3_small', 576),
                                            ('mobilenet_v3_large', 960)])
def test_feature_map_shapes_follow_torch_padding(name, channels):
  model = models.create(name, 7)
  x = jax.ShapeDtypeStruct((2, 193, 257, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features), variables, x)
  # Five stride-2 convs with padding (k-1)//2: 193 → 97 → 49 → 25 → 13 → 7, 257 → ... → 9.
  assert feats.shape == (2, 7, 9, channels)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)


def test_module_names_mirror_torchvision_blocks():
  model = models.create('mobilenet_v3_small', 1000)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  backbone = variables['params']['backbone']
  assert sorted(backbone, key=lambda k: int(k.split('_')[1])) == [f'features_{i}' for i in range(13)]
  assert set(backbone['features_1']) == {'depthwise', 'se', 'project'}  # no expand: 16 → 16
  assert set(backbone['features_2']) == {'expand', 'depthwise', 'project'}  # no SE
  assert backbone['features_1']['se']['fc1']['kernel'].shape == (1, 1, 16, 8)
  assert backbone['features_1']['depthwise']['conv']['kernel'].shape == (3, 3, 1, 16)
  assert set(variables['params']['head']) == {'hidden0', 'logits'}
  assert variables['params']['head']['hidden0']['kernel'].shape == (576, 1024)


def test_tiny_bf16_tracks_float32_and_bn_train_updates_batch_stats():
  fixture = _fixture('mobilenet_tiny')
  variables = from_torchvision(reference_weights.build(fixture['manifest'], fixture['seed']),
                               'mobilenet_tiny', num_classes=10)
  x = reference_weights.random_inputs(0, (4, 32, 32, 3))
  f32 = jax.jit(models.create('mobilenet_tiny', 10).apply)(variables, x)
  model = models.create('mobilenet_tiny', 10, dtype=jnp.bfloat16)

  @jax.jit
  def bf16_eval_and_bn_train(v, x):
    return model.apply(v, x), model.apply(v, x, bn_train=True, mutable=['batch_stats'])[1]

  bf16, updates = bf16_eval_and_bn_train(variables, x)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.05 * float(np.abs(f32).max()))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(updates))
  for path in (('features_0', 'bn'), ('features_3', 'project', 'bn')):
    before, after = variables['batch_stats']['backbone'], updates['batch_stats']['backbone']
    for key in path:
      before, after = before[key], after[key]
    assert not np.allclose(before['mean'], after['mean']), path


def _check_parity(model, variables, inputs, logits_list, label: str) -> list[str]:
  apply = jax.jit(model.apply)
  deltas = []
  for spec, expected in zip(inputs, logits_list):
    x = reference_weights.random_inputs(spec['seed'], spec['shape'])
    expected = np.asarray(expected, np.float32)
    got = np.asarray(apply(variables, x))
    assert got.shape == expected.shape
    delta = float(np.abs(got - expected).max())
    expected_max = float(np.abs(expected).max())
    tolerance = 1e-4 * max(1.0, expected_max)
    assert delta <= tolerance, f'{label} {spec["shape"]}: max|Δlogits| {delta:.3g} > {tolerance:.3g}'
    deltas.append(f'{spec["shape"][1]}x{spec["shape"][2]}: {delta:.3g} (max|logits| {expected_max:.3g})')
  return deltas


@pytest.mark.parametrize('arch', ARCHS + ('mobilenet_tiny',))
def test_golden_parity_with_torchvision(arch):
  fixture = _fixture(arch)
  state_dict = reference_weights.build(fixture['manifest'], fixture['seed'])
  num_classes = len(fixture['logits'][0][0])
  variables = from_torchvision(state_dict, arch, num_classes=num_classes)
  deltas = _check_parity(models.create(arch, num_classes), variables, fixture['inputs'],
                         fixture['logits'], arch)
  print(f'{arch}: max|Δlogits| per size {deltas}')


def test_converter_fills_every_flax_path_of_the_model():
  fixture = _fixture('mobilenet_tiny')
  reader = StateDictReader(reference_weights.build(fixture['manifest'], fixture['seed']))
  convert(reader, 'mobilenet_tiny')
  ported = reader.finish()
  model = models.create('mobilenet_tiny', 10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  same = jax.tree_util.tree_map(lambda a, s: a.shape == s.shape, ported, shapes)
  assert all(jax.tree_util.tree_leaves(same))


def test_small_state_dict_given_as_large_lists_every_problem():
  state_dict = reference_weights.build(_fixture('mobilenet_v3_small')['manifest'], 0)
  with pytest.raises(PortError) as info:
    from_torchvision(state_dict, 'mobilenet_v3_large')
  message = str(info.value)
  assert 'mobilenet_v3_large' in message
  assert 'missing' in message and 'unexpected' in message and 'shape mismatch' in message
  # small's features.2 expands 16 → 72, large's 16 → 64 (the kernel is HWIO after the port).
  assert 'features_2/expand/conv/kernel: checkpoint (1, 1, 16, 72) vs model (1, 1, 16, 64)' in message
  assert 'features.16.0.weight' in message  # large's last conv; small ends at features.12
  assert 'features.1.block.1.fc1.weight' in message  # small's first block has SE, large's not
  assert 'features.12.0.weight' in message


def test_unknown_arch_is_rejected():
  with pytest.raises(ValueError, match='mobilenet_v3_small'):
    convert(StateDictReader({}), 'mobilenet_v4')


def test_catalog_entries_match_torchvision_weight_enums():
  assert set(CATALOG_ENTRIES) == {
      'mobilenet_v2', 'mobilenet_v2:IMAGENET1K_V1', 'mobilenet_v2:IMAGENET1K_V2',
      'mobilenet_v3_large', 'mobilenet_v3_large:IMAGENET1K_V1', 'mobilenet_v3_large:IMAGENET1K_V2',
      'mobilenet_v3_small', 'mobilenet_v3_small:IMAGENET1K_V1'}
  for key, spec in CATALOG_ENTRIES.items():
    assert spec.key == key and spec.source == 'torchvision'
    assert spec.url == 'https://download.pytorch.org/models/' + spec.filename
    # torch.hub's check_hash compares the filename's 8 hex digits with the SHA-256.
    assert spec.filename == f'{spec.arch}-{spec.sha256[:8]}.pth' and len(spec.sha256) == 64
    assert spec.preprocessing.input_size == 224
  # torchvision's DEFAULT members; the newer-recipe (V2) weights resize to 232.
  assert CATALOG_ENTRIES['mobilenet_v2'].filename == 'mobilenet_v2-7ebf99e0.pth'
  assert CATALOG_ENTRIES['mobilenet_v3_large'].filename == 'mobilenet_v3_large-5c1a4163.pth'
  assert CATALOG_ENTRIES['mobilenet_v3_small'].filename == 'mobilenet_v3_small-047dcff4.pth'
  assert CATALOG_ENTRIES['mobilenet_v2'].preprocessing.resize == 232
  assert CATALOG_ENTRIES['mobilenet_v2:IMAGENET1K_V1'].preprocessing.resize == 256
  assert CATALOG_ENTRIES['mobilenet_v3_small'].preprocessing.resize == 256


@pytest.mark.reference
@pytest.mark.parametrize('arch', ARCHS + ('mobilenet_tiny',))
def test_live_parity_with_torchvision(arch):
  torch = pytest.importorskip('torch')
  from tools import fixtures_torchvision_mobilenet as gen
  model_t, _ = gen.seeded_model(arch, seed=3)
  state_dict = {k: v.numpy() for k, v in model_t.state_dict().items()}
  num_classes = gen.TINY_CLASSES if arch == 'mobilenet_tiny' else 1000
  inputs, logits = [], []
  for i, (h, w) in enumerate(gen.SIZES.get(arch, gen.SIZES['default'])):
    spec = {'seed': 300 + i, 'shape': [2, h, w, 3]}
    x = reference_weights.random_inputs(spec['seed'], spec['shape'])
    with torch.no_grad():
      logits.append(model_t(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy())
    inputs.append(spec)
  variables = from_torchvision(state_dict, arch, num_classes=num_classes)
  deltas = _check_parity(models.create(arch, num_classes), variables, inputs, logits, arch)
  print(f'{arch} live: max|Δlogits| per size {deltas}')
