"""ViT: golden parity with torchvision and timm at two sizes, strict ports, freezing, dtypes.

Golden fixtures (tests/fixtures/vit/<case>.json, tools/fixtures_vit.py) hold
a weight manifest + seed and the logits real torchvision / timm computed at
the stored size and at a second size (where the reference resampled its
position embedding its own way); numpy rebuilds the same state dict, tljax
ports it and must reproduce the logits within 1e-4 * max(1, max|logits|).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_weights
from tljax import models, optim
from tljax.models import vit
from tljax.porting import torchvision as tv
from tljax.porting import vit as port_vit
from tljax.porting.merge import PortError

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ('vit_tiny_timm', 'vit_tiny_timm_avg', 'vit_tiny_torchvision', 'vit_small_patch16_224',
         'vit_small_patch16_224_avg', 'vit_base_patch16_224', 'vit_b_16')


@functools.lru_cache(maxsize=None)
def golden(case):
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', 'vit', f'{case}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['seed'])


@functools.lru_cache(maxsize=None)
def jitted_apply(arch, num_classes, arch_kw=()):
  return jax.jit(models.create(arch, num_classes, **dict(arch_kw)).apply)


def port(fx, state_dict):
  """Through `from_torchvision` where torchvision knows the arch, else the family's port."""
  if fx['source'] == 'torchvision' and fx['arch'] in tv.ARCHS:
    return tv.from_torchvision(state_dict, fx['arch'], num_classes=len(fx['logits'][0][0]))
  return port_vit.port_state_dict(state_dict, fx['arch'], fx['source'], **fx['arch_kw'])


def check_logits(label, fx, variables, x, ref):
  arch_kw = dict(fx['arch_kw'])
  if x.shape[1:3] == (models.input_size(fx['arch']),) * 2:
    # pos_resample acts only off the stored grid; without it torchvision's and timm's ViT-B
    # share one compiled model here.
    arch_kw.pop('pos_resample', None)
  apply = jitted_apply(models.resolve(fx['arch'])[0], ref.shape[-1], tuple(sorted(arch_kw.items())))
  y = np.asarray(apply(variables, x))
  err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
  print(f'{label} {fx["case"]} {x.shape[1]}x{x.shape[2]}: max|dlogits| = {err:.3g} '
        f'(max|logits| = {scale:.4g}, tol = {1e-4 * max(1.0, scale):.3g})')
  assert y.shape == ref.shape
  assert err <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize('case', CASES)
def test_golden_parity_at_stored_and_second_size(case):
  fx, state_dict = golden(case)
  variables = port(fx, state_dict)
  assert len(fx['inputs']) >= 2 and len({i['shape'][1] for i in fx['inputs']}) >= 2
  for inp, ref in zip(fx['inputs'], fx['logits']):
    x = reference_weights.random_inputs(inp['seed'], inp['shape'])
    check_logits('golden', fx, variables, x, np.asarray(ref, np.float32))


def tiny(case='vit_tiny_timm'):
  fx, sd = golden(case)
  return fx, sd, port_vit.port_state_dict(sd, 'vit_tiny', fx['source'], **fx['arch_kw'])


def test_every_problem_is_listed_in_one_error():
  _, sd, _ = tiny()
  sd = dict(sd)
  del sd['blocks.1.norm2.bias']
  sd['blocks.3.norm1.weight'] = np.ones(32, np.float32)
  sd['blocks.0.mlp.fc1.weight'] = np.zeros((48, 32), np.float32)
  with pytest.raises(PortError) as e:
    port_vit.port_state_dict(sd, 'vit_tiny', 'timm')
  msg = str(e.value)
  assert 'missing (1):\n    blocks.1.norm2.bias' in msg
  assert 'unexpected (1):\n    blocks.3.norm1.weight  (32,)' in msg
  assert ('shape mismatch (1):\n    params/backbone/block_0/mlp/fc1/kernel: '
          'checkpoint (32, 48) vs model (32, 64)') in msg


def test_position_embedding_of_another_grid_is_a_shape_error_naming_it():
  _, sd, _ = tiny()
  sd = dict(sd, pos_embed=np.zeros((1, 37, 32), np.float32))
  mismatch = r'shape mismatch \(1\):\n    params/backbone/embed/pos_embed'
  with pytest.raises(PortError, match=mismatch):
    port_vit.port_state_dict(sd, 'vit_tiny', 'timm')
  # Declaring the checkpoint's grid (img_size) makes the same tensors fit.
  variables = port_vit.port_state_dict(sd, 'vit_tiny', 'timm', img_size=48)
  assert variables['params']['backbone']['embed']['pos_embed'].shape == (1, 37, 32)


def test_torchvision_layout_is_strict_too():
  fx, sd = golden('vit_tiny_torchvision')
  sd = dict(sd)
  sd.pop('encoder.layers.encoder_layer_2.self_attention.in_proj_bias')
  with pytest.raises(PortError, match='missing \\(1\\):\n    encoder.layers.encoder_layer_2'
                                      '.self_attention.in_proj_bias'):
    port_vit.port_state_dict(sd, 'vit_tiny', 'torchvision')
  with pytest.raises(PortError, match='missing'):
    tv.from_torchvision({}, 'vit_b_16')
  # A timm checkpoint read as torchvision's: nothing of either layout lines up.
  with pytest.raises(PortError, match='unexpected'):
    port_vit.port_state_dict(golden('vit_tiny_timm')[1], 'vit_tiny', 'torchvision')


def test_registries_name_the_ported_architectures():
  assert set(port_vit.TIMM_CONVERTERS) == {'vit_small_patch16_224', 'vit_base_patch16_224'}
  assert 'vit_b_16' in tv.ARCHS
  spec = tv.CATALOG['vit_b_16']
  assert tv.CATALOG['vit_b_16:IMAGENET1K_V1'].filename == spec.filename  # torchvision's DEFAULT
  assert spec.url == 'https://download.pytorch.org/models/vit_b_16-c867db91.pth'
  assert spec.sha256.startswith('c867db91') and len(spec.sha256) == 64
  assert (spec.preprocessing.input_size, spec.preprocessing.resize) == (224, 256)


def _trainable(labels):
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  return {'/'.join(k.key for k in path[:2]) for path, v in flat if v == optim.TRAINABLE}


def test_top_2_unfreezes_the_last_two_blocks_and_the_final_norm():
  model = models.create('vit_tiny', 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  blocks = optim.backbone_blocks(model, params, (1, 32, 32, 3))
  assert blocks == [['embed'], ['block_0'], ['block_1'], ['block_2', 'norm']]
  labels = optim.param_labels(params, 'top:2', blocks)
  assert _trainable(labels) == {'backbone/block_1', 'backbone/block_2', 'backbone/norm'}
  avg = models.create('vit_tiny', 3, pool='avg')
  params = jax.eval_shape(avg.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert optim.backbone_blocks(avg, params, (1, 32, 32, 3))[-1] == ['block_2', 'fc_norm']


def test_bfloat16_compute_is_close_to_float32_with_float32_params():
  _, _, variables = tiny()
  x = reference_weights.random_inputs(7, (2, 32, 32, 3))
  f32 = np.asarray(jitted_apply('vit_tiny', 10)(variables, x))
  model = models.create('vit_tiny', 10, dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype('float32')}
  features = jax.eval_shape(lambda v: model.apply(v, x, method=model.features), variables)
  assert features.dtype == jnp.bfloat16
  bf16 = jax.jit(model.apply)(variables, x)
  assert bf16.dtype == jnp.float32
  err = float(np.abs(np.asarray(bf16) - f32).max())
  assert 0 < err < 0.05 * max(1.0, float(np.abs(f32).max())), err


def test_forward_and_gradient_at_other_input_sizes():
  _, _, variables = tiny()
  model = models.create('vit_tiny', 10)
  loss = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for shape in ((2, 48, 48, 3), (2, 40, 56, 3)):
    value, grads = value_and_grad(variables['params'], reference_weights.random_inputs(3, shape))
    assert np.isfinite(value)
    pos = np.asarray(grads['backbone']['embed']['pos_embed'])
    assert np.isfinite(pos).all() and np.abs(pos[0, 1:]).max() > 0, shape


def test_drop_path_follows_train_and_stochastic():
  _, _, variables = tiny()
  model = models.create('vit_tiny', 10, drop_path=0.5)
  x = reference_weights.random_inputs(4, (2, 32, 32, 3))

  @jax.jit
  def outputs(v, rng):
    rngs = {'dropout': rng}
    return (model.apply(v, x), model.apply(v, x, train=True, stochastic=False, rngs=rngs),
            model.apply(v, x, train=False, stochastic=True, rngs=rngs))

  ref, kept, dropped = map(np.asarray, outputs(variables, jax.random.key(1)))
  np.testing.assert_array_equal(kept, ref)
  assert np.abs(dropped - ref).max() > 1e-3


def test_features_are_pooled_and_feed_the_head_directly():
  _, _, variables = tiny()
  model = models.create('vit_tiny', 10)
  x = reference_weights.random_inputs(5, (2, 32, 32, 3))

  @jax.jit
  def outputs(v):
    features = model.apply(v, x, method=model.features)
    return features, model.apply(v, features, method=model.apply_head)

  features, logits = outputs(variables)
  assert features.shape == (2, 32)
  np.testing.assert_allclose(logits, jitted_apply('vit_tiny', 10)(variables, x), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('kw, message', [
    (dict(pool='max'), "pool must be one of"),
    (dict(img_size=36), 'multiple of the patch size 8'),
    (dict(pos_resample='bilinear'), 'pos_resample must be one of'),
    (dict(drop_path=1.0), r'drop_path must be in \[0, 1\)'),
    (dict(depth=4), 'unexpected keyword'),
])
def test_bad_architecture_options_are_named(kw, message):
  with pytest.raises((ValueError, TypeError), match=message):
    models.create('vit_tiny', 3, **kw)


def test_input_not_a_multiple_of_the_patch_is_refused():
  model = models.create('vit_tiny', 3)
  with pytest.raises(ValueError, match='30x32 is not a multiple of the patch size 8'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


def test_resampling_to_the_stored_grid_is_the_identity_and_keeps_a_constant():
  for mode in vit.POS_RESAMPLE:
    for n_in, n_out in ((14, 14), (14, 18), (14, 10), (4, 3)):
      m = vit.resample_matrix(n_in, n_out, mode)
      np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
      if n_in == n_out:
        np.testing.assert_allclose(m, np.eye(n_in), atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize('case', CASES)
def test_live_parity_against_the_reference_library(case, tmp_path):
  """Rebuilds the reference models in-process with seed 1 (the golden files use 0)."""
  import torch
  sys.path.insert(0, os.path.dirname(HERE))
  from tools import fixtures_vit as fixtures
  source, _, arch, arch_kw, sizes = fixtures.CASES[case]
  ref_models, _ = fixtures.seeded_models(case, seed=1)
  state_dict = {k: v.numpy() for k, v in ref_models[0].state_dict().items()}
  classes = state_dict['head.weight' if source == 'timm' else 'heads.head.weight'].shape[0]
  fx = {'case': case, 'source': source, 'arch': arch, 'arch_kw': arch_kw,
        'logits': [[[0.0] * classes]]}
  variables = port(fx, state_dict)
  if case == 'vit_b_16':
    path = tmp_path / 'vit_b_16.pth'
    torch.save(ref_models[0].state_dict(), path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables,
                           tv.from_torchvision(path, 'vit_b_16'))
  for i, (size, model) in enumerate(zip(sizes, ref_models)):
    x = reference_weights.random_inputs(100 + i, (2, size, size, 3))
    check_logits('live', fx, variables, x, fixtures.reference_logits(model, x))
