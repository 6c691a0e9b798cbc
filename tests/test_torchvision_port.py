"""torchvision → tljax ResNet port: golden parity, strictness, head replacement, catalog.

Golden fixtures (tests/fixtures/torchvision/<arch>.json) hold a weight
manifest + seed and the logits real torchvision computed with those weights
(tools/fixtures_torchvision.py); here numpy rebuilds the same state dict and
tljax must reproduce the logits within 1e-4 * max(1, max|logits|).
"""

import os
import re
import sys

import jax
import numpy as np
import pytest

import reference_weights
from tljax import models
from tljax.porting import catalog
from tljax.porting import torchvision as tv
from tljax.porting.merge import PortError, flatten

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = ('resnet_tiny', 'resnet18', 'resnet34', 'resnet50')


def golden(arch):
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', 'torchvision', f'{arch}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['seed'])


def check_logits(arch, apply, variables, x, ref, label):
  y = np.asarray(apply(variables, x))
  err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
  print(f'{label} {arch} {x.shape[1]}x{x.shape[2]}: max|dlogits| = {err:.3g} '
        f'(max|logits| = {scale:.4g}, tol = {1e-4 * max(1.0, scale):.3g})')
  assert y.shape == ref.shape
  assert err <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize('arch', ARCHS)
def test_golden_parity_at_224_and_non_square(arch):
  fx, state_dict = golden(arch)
  num_classes = len(fx['logits'][0][0])
  variables = tv.from_torchvision(state_dict, arch, num_classes=num_classes)
  apply = jax.jit(models.create(arch, num_classes).apply)
  for case, ref in zip(fx['inputs'], fx['logits']):
    x = reference_weights.random_inputs(case['seed'], case['shape'])
    check_logits(arch, apply, variables, x, np.asarray(ref, np.float32), 'golden')


def test_port_from_a_real_torch_save_file_equals_port_from_arrays():
  _, state_dict = golden('resnet_tiny')
  path = os.path.join(HERE, 'fixtures', 'torch_pickles', 'resnet_tiny_zip.pth')
  from_file = tv.from_torchvision(path, 'resnet_tiny', num_classes=10)
  from_arrays = tv.from_torchvision(state_dict, 'resnet_tiny', num_classes=10)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_file, from_arrays)
  assert from_file['params']['backbone']['conv1']['kernel'].shape == (7, 7, 3, 8)  # OIHW -> HWIO


def test_every_problem_is_listed_in_one_error():
  _, sd = golden('resnet18')
  del sd['layer2.0.downsample.1.running_var']
  sd['layer5.0.conv1.weight'] = np.zeros((3, 3), np.float32)
  sd['layer1.0.conv1.weight'] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(PortError) as e:
    tv.from_torchvision(sd, 'resnet18')
  msg = str(e.value)
  assert 'missing (1):\n    layer2.0.downsample.1.running_var' in msg
  assert 'unexpected (1):\n    layer5.0.conv1.weight  (3, 3)' in msg
  assert ('shape mismatch (1):\n    params/backbone/layer1_0/conv1/kernel: '
          'checkpoint (1, 1, 64, 64) vs model (3, 3, 64, 64)') in msg


def test_shape_mismatch_alone_is_an_error():
  _, sd = golden('resnet18')
  sd['bn1.running_mean'] = np.zeros(65, np.float32)
  with pytest.raises(PortError, match=r'shape mismatch \(1\):\n    batch_stats/backbone/bn1/mean'):
    tv.from_torchvision(sd, 'resnet18')


def test_resnet50_file_as_resnet34_lists_the_differences():
  _, sd = golden('resnet50')
  with pytest.raises(PortError) as e:
    tv.from_torchvision(sd, 'resnet34')
  msg = str(e.value)
  unexpected = int(re.search(r'unexpected \((\d+)\)', msg).group(1))
  mismatched = int(re.search(r'shape mismatch \((\d+)\)', msg).group(1))
  # conv3 + bn3 of all 16 bottlenecks and layer1.0's downsample, 5 tensors each (BN's
  # num_batches_tracked is not counted), have no place in a resnet34.
  assert unexpected == 17 * 5
  assert 'layer1.0.conv3.weight  (256, 64, 1, 1)' in msg
  assert 'params/head/logits/kernel: checkpoint (2048, 1000) vs model (512, 1000)' in msg
  # Same key, other shape: every block's conv1 (1x1 in a bottleneck), the downsample
  # conv + 4 BN leaves of layers 2-4 (4x wider in resnet50), and fc.
  assert mismatched == 16 + 3 * 5 + 1


def test_new_head_keeps_the_backbone_bit_identical_and_reports_what_it_replaced():
  _, sd = golden('resnet18')
  pretrained, none_replaced = tv.port(sd, 'resnet18')
  assert none_replaced == []
  ported, replaced = tv.port(sd, 'resnet18', num_classes=10, rng=jax.random.PRNGKey(3))
  assert replaced == ['params/head/logits/bias', 'params/head/logits/kernel']
  new, old = flatten(ported), flatten(pretrained)
  assert set(new) == set(old)
  for path in old:
    if path not in replaced:
      assert new[path].dtype == old[path].dtype
      np.testing.assert_array_equal(new[path], old[path], err_msg=path)
  assert new['params/head/logits/kernel'].shape == (512, 10)
  assert np.std(new['params/head/logits/kernel']) > 0
  np.testing.assert_array_equal(new['params/head/logits/bias'], np.zeros(10))


def test_unknown_arch_names_the_known_ones():
  with pytest.raises(ValueError, match='resnet34'):
    tv.from_torchvision({}, 'resnet35')


def test_mobilenets_dispatch_to_their_converter():
  for arch in ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large'):
    assert arch in tv.ARCHS and arch in tv.CATALOG
  with pytest.raises(PortError, match='missing'):
    tv.from_torchvision({}, 'mobilenet_v2')


def test_catalog_entries_are_consistent():
  for key, spec in tv.CATALOG.items():
    assert catalog.lookup('torchvision', spec.arch, spec.variant) == spec
    assert spec.url == 'https://download.pytorch.org/models/' + spec.filename
    prefix = re.search(r'-([0-9a-f]{8})\.pth$', spec.filename).group(1)
    assert spec.sha256 and len(spec.sha256) == 64 and spec.sha256.startswith(prefix), key
    assert spec.preprocessing.input_size == 224
    assert spec.preprocessing.resize == (232 if spec.filename in (
        'resnet50-11ad3fa6.pth', 'mobilenet_v2-7ebf99e0.pth', 'mobilenet_v3_large-5c1a4163.pth')
        else 236 if spec.filename == 'convnext_tiny-983f1562.pth' else 256), key
  assert tv.CATALOG['resnet50'].filename == 'resnet50-11ad3fa6.pth'  # torchvision's DEFAULT
  assert tv.CATALOG['resnet50:IMAGENET1K_V1'].filename == 'resnet50-0676ba61.pth'
  assert {tv.CATALOG[a].filename for a in ('resnet18', 'resnet34')} == {
      'resnet18-f37072fd.pth', 'resnet34-b627a593.pth'}


@pytest.mark.reference
@pytest.mark.parametrize('arch', ARCHS)
def test_live_parity_against_torchvision(arch, tmp_path):
  """Builds the torchvision model in-process (seed 1, unlike the golden files) and ports it twice:
  from its state_dict arrays and from a `torch.save`d file through the pickle reader."""
  import torch
  sys.path.insert(0, os.path.dirname(HERE))
  from tools import fixtures_torchvision as fixtures
  model, _ = fixtures.seeded_model(arch, seed=1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  num_classes = state_dict['fc.weight'].shape[0]
  path = tmp_path / f'{arch}.pth'
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=arch != 'resnet34')
  ported = [tv.from_torchvision(state_dict, arch, num_classes), tv.from_torchvision(path, arch,
                                                                                    num_classes)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *ported)
  apply = jax.jit(models.create(arch, num_classes).apply)
  sizes = ((32, 32), (29, 37)) if arch == 'resnet_tiny' else fixtures.SIZES
  for i, (h, w) in enumerate(sizes):
    x = reference_weights.random_inputs(100 + i, (2, h, w, 3))
    with torch.no_grad():
      ref = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    check_logits(arch, apply, ported[1], x, ref, 'live')
