"""RandAugment / TrivialAugment ops, Mixup / CutMix targets, and their config and cache guards."""

import functools
import importlib.util
import pathlib
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from tljax import feature_cache
from tljax.data import augment, default_augment_config
from tljax.data.config import validate_augment_config
from tljax.data.preprocess import Preprocessing

SPEC = Preprocessing(input_size=28, resize=32)
OPS = augment.POLICY_OPS
MAGNITUDE_FREE = ('identity', 'autocontrast', 'equalize')
# The last commit whose augment.py predates op policies: policy='none' must match it bit for bit.
BEFORE_POLICIES = '1e005f1452ba63387c5c99425b4abdf8a28ddf8e'


def _aug(**kw):
  cfg = default_augment_config()
  cfg.update(kw)
  validate_augment_config(cfg)
  return cfg


def _image(seed=0, lo=0, hi=255, s=20):
  return np.random.default_rng(seed).integers(lo, hi, (s, s, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _op_fn(policy):
  """One compile for every op, bin and sign: they are traced arguments."""
  return jax.jit(lambda x, op, m, sign: augment.policy_op(x, op, m, sign, policy=policy))


@pytest.mark.parametrize('policy', ['randaugment', 'trivialaugment'])
def test_each_op_is_identity_at_bin_zero_changes_at_the_top_and_stays_in_range(policy):
  f = _op_fn(policy)
  x = _image(hi=255)                          # no 255, so solarize's threshold 255 inverts nothing
  dull = _image(lo=60, hi=120)                # for the magnitude-free autocontrast and equalize
  for i, name in enumerate(OPS):
    for sign in (1.0, -1.0):
      zero = np.asarray(f(x, i, 0.0, sign))
      if name not in MAGNITUDE_FREE:
        np.testing.assert_array_equal(zero, x, err_msg=name)
      src = dull if name in MAGNITUDE_FREE else x
      top = np.asarray(f(src, i, 30.0, sign))
      assert top.shape == x.shape and np.isfinite(top).all(), name
      assert top.min() >= 0.0 and top.max() <= 255.0, name
      if name != 'identity':
        assert np.abs(top - src).max() > 10, (name, sign)
  np.testing.assert_array_equal(np.asarray(f(x, OPS.index('identity'), 30.0, 1.0)), x)


def test_signed_ops_go_both_ways_and_unsigned_ones_ignore_the_sign():
  f = _op_fn('randaugment')
  x = _image(1)
  for i, name in enumerate(OPS):
    plus, minus = np.asarray(f(x, i, 20.0, 1.0)), np.asarray(f(x, i, 20.0, -1.0))
    assert np.array_equal(plus, minus) == (name in
                                           ('identity', 'posterize', 'solarize', 'autocontrast',
                                            'equalize')), name


def test_pixel_ops_match_pil_on_uint8_images():
  """Equalize, posterize and solarize are PIL's (and torchvision's) uint8 ops, exactly."""
  f = _op_fn('trivialaugment')
  u8 = (np.random.default_rng(2).beta(2, 5, (24, 24, 3)) * 255).astype(np.uint8)
  pil = Image.fromarray(u8)
  x = u8.astype(np.float32)
  np.testing.assert_array_equal(f(x, OPS.index('equalize'), 0.0, 1.0),
                                np.asarray(ImageOps.equalize(pil)))
  # trivialaugment posterize: bin 30 keeps 2 bits, bin 15 keeps 5
  np.testing.assert_array_equal(f(x, OPS.index('posterize'), 30.0, 1.0),
                                np.asarray(ImageOps.posterize(pil, 2)))
  np.testing.assert_array_equal(f(x, OPS.index('posterize'), 15.0, 1.0),
                                np.asarray(ImageOps.posterize(pil, 5)))
  # solarize: bin 10 puts the threshold at 170
  np.testing.assert_array_equal(f(x, OPS.index('solarize'), 10.0, 1.0),
                                np.asarray(ImageOps.solarize(pil, 170)))
  auto = np.asarray(f(x, OPS.index('autocontrast'), 0.0, 1.0))
  np.testing.assert_allclose(auto, np.asarray(ImageOps.autocontrast(pil)), atol=1.0)


def test_geometric_ops_rotate_a_quarter_turn_and_translate_with_zero_fill():
  f = _op_fn('trivialaugment')
  x = _image(3, lo=1, s=16)                   # no zeros, so the fill is visible
  quarter = np.asarray(f(x, OPS.index('rotate'), 20.0, 1.0))        # 135° · 20/30 = 90°
  assert any(np.array_equal(quarter, np.rot90(x, k)) for k in (1, -1))
  # randaugment translate_x at bin 30: 150/331 of 16 px → a 7 px shift, zero fill behind it
  shifted = np.asarray(_op_fn('randaugment')(x, OPS.index('translate_x'), 30.0, 1.0))
  np.testing.assert_array_equal(shifted[:, 7:], x[:, :-7])
  assert (shifted[:, :7] == 0).all()
  sheared = np.asarray(f(x, OPS.index('shear_x'), 15.0, 1.0))
  np.testing.assert_array_equal(sheared[0], x[0])                    # about the top-left row
  assert (sheared == 0).any()


def test_apply_policy_is_deterministic_per_key_and_varies_per_image_and_key():
  imgs = jnp.asarray(np.stack([_image(0)] * 8))
  for cfg in (dict(policy='randaugment', policy_ops=2, policy_magnitude=12),
              dict(policy='trivialaugment')):
    f = jax.jit(lambda k, x, cfg=cfg: augment.apply_policy(k, x, cfg))
    a, b = np.asarray(f(jax.random.key(0), imgs)), np.asarray(f(jax.random.key(0), imgs))
    c = np.asarray(f(jax.random.key(1), imgs))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({a[i].tobytes() for i in range(8)}) > 4
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255


def _old_augment():
  try:
    source = subprocess.run(['git', 'show', f'{BEFORE_POLICIES}:tljax/data/augment.py'],
                            cwd=pathlib.Path(__file__).parent, capture_output=True, text=True,
                            check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip('the pre-policy augment.py is not in this checkout')
  module = types.ModuleType('augment_before_policies')
  exec(compile(source, 'augment_before_policies.py', 'exec'), module.__dict__)
  return module


def test_policy_none_is_bit_identical_to_the_code_before_policies():
  old = _old_augment()
  assert not hasattr(old, 'apply_policy')
  cfg = _aug(rotation=15.0, zoom=0.1, brightness=0.2, contrast=0.2, saturation=0.2)
  imgs = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  for key in (jax.random.key(7), jax.random.key(7, impl='rbg')):
    new = jax.jit(lambda k, x: augment.train_transform(k, x, cfg, 24, SPEC))(key, imgs)
    ref = jax.jit(lambda k, x: old.train_transform(k, x, cfg, 24, SPEC))(key, imgs)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(ref))


def test_train_transform_with_a_policy_is_deterministic_and_in_range():
  cfg = _aug(policy='randaugment', policy_magnitude=15)
  imgs = np.repeat(np.random.default_rng(5).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 6, 0)
  f = jax.jit(lambda k, x: augment.train_transform(k, x, cfg, 24, SPEC))
  base = jax.jit(lambda k, x: augment.train_transform(k, x, _aug(), 24, SPEC))
  key = jax.random.key(3, impl='rbg')
  a, b = np.asarray(f(key, imgs)), np.asarray(f(key, imgs))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, np.asarray(f(jax.random.key(4, impl='rbg'), imgs)))
  assert not np.array_equal(a, np.asarray(base(key, imgs)))
  pixels = np.asarray(a) * np.asarray(SPEC.std) + np.asarray(SPEC.mean)
  assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def _tagged(b=8, s=8):
  """Example i is the constant image i + 1, so every mixed pixel tells its sources."""
  return jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None],
                          (b, s, s, 3))


def test_mixup_targets_are_lambda_times_onehot_plus_the_reversed_partner():
  cfg = _aug(mixup_alpha=0.4)
  images, labels = _tagged(), jnp.asarray([0, 1, 2, 3, 4, 0, 1, 2])
  for seed in range(4):
    mixed, targets = augment.mix_batch(jax.random.key(seed), images, labels, 5, cfg)
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    lam = (mixed[0, 0, 0, 0] - 8.0) / (1.0 - 8.0)           # λ·1 + (1 − λ)·8
    np.testing.assert_allclose(mixed[:, 0, 0, 0],
                               lam * np.arange(1, 9) + (1 - lam) * np.arange(8, 0, -1), rtol=1e-5)
    onehot = np.eye(5)[labels]
    np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-5)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    assert targets.dtype == np.float32


def test_cutmix_lambda_is_one_minus_the_pasted_area():
  cfg = _aug(cutmix_alpha=1.0)
  images, labels = _tagged(s=16), jnp.arange(8) % 3
  f = jax.jit(lambda k: augment.mix_batch(k, images, labels, 3, cfg))
  lams = []
  for seed in range(12):
    mixed, targets = map(np.asarray, f(jax.random.key(seed)))
    pasted = mixed[0, :, :, 0] == 8.0                         # example 0's partner is example 7
    assert np.isin(mixed[0], [1.0, 8.0]).all()
    lam = 1 - pasted.mean()
    rows, cols = np.nonzero(pasted)
    if rows.size:                                             # the pasted region is one box
      assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)
    lams.append(lam)
  assert len(set(lams)) > 3


def test_binary_targets_mixing_probability_and_switch():
  cfg = _aug(mixup_alpha=1.0, cutmix_alpha=1.0, mix_switch_prob=0.5, mix_prob=0.5)
  images, labels = _tagged(s=16), jnp.asarray([1, 0, 0, 0, 1, 1, 0, 0])

  @jax.jit
  def kinds(keys):
    def one(k):
      mixed, targets = augment.mix_batch(k, images, labels, 1, cfg)
      first = mixed[0, :, :, 0]
      untouched = jnp.all(mixed == images)
      cut = ~untouched & jnp.all((first == 1.0) | (first == 8.0))
      lam = jnp.mean(first - 8.0) / (1.0 - 8.0)              # either kind: mean of example 0
      expect = lam * labels + (1 - lam) * labels[::-1]
      return untouched, cut, jnp.abs(targets - expect).max(), targets.shape[0]
    return jax.vmap(one)(keys)
  untouched, cut, err, b = map(np.asarray, kinds(jax.random.split(jax.random.key(0), 400)))
  assert (b == 8).all() and err.max() < 1e-5
  assert 0.4 < untouched.mean() < 0.6                         # mix_prob
  assert 0.4 < cut[~untouched].mean() < 0.6                   # mix_switch_prob


def test_no_mixing_returns_the_batch_and_hard_targets():
  images, labels = _tagged(), jnp.arange(8) % 4
  for cfg in (_aug(), _aug(mixup_alpha=1.0, mix_prob=0.0)):
    assert not augment.mixing_enabled(cfg)
    mixed, targets = augment.mix_batch(jax.random.key(0), images, labels, 4, cfg)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, np.eye(4)[labels])
  assert augment.mixing_enabled(_aug(cutmix_alpha=1.0))
  _, smooth = augment.mix_batch(jax.random.key(0), images, labels, 4, _aug(mixup_alpha=1.0),
                                label_smoothing=0.1)
  np.testing.assert_allclose(np.asarray(smooth).sum(1), 1.0, atol=1e-6)
  assert np.asarray(smooth).min() >= 0.1 / 4 - 1e-6


@pytest.mark.parametrize('field,value', [
    ('policy', 'autoaugment'), ('policy_ops', 0), ('policy_magnitude', 31),
    ('policy_magnitude', -1), ('mixup_alpha', -0.1), ('cutmix_alpha', float('nan')),
    ('mix_prob', 1.5), ('mix_switch_prob', -0.5)])
def test_augment_config_validation_names_the_field_and_fix(field, value):
  cfg = default_augment_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=rf'augment\.{field}=.*expected|augment\.{field}=.*use one'):
    validate_augment_config(cfg)


def test_feature_cache_refuses_policies_and_mixing_on_augmenting_phases():
  phase = types.SimpleNamespace(cache_features=True, bn='frozen', augment=True, cache_views=2)
  params, labels = {'head': {'w': 0}}, {'head': {'w': 'trainable'}}
  assert feature_cache.eligible(phase, params, labels, {}) is None
  assert feature_cache.eligible(phase, params, labels, {}, augment_cfg=_aug()) is None
  reason = feature_cache.eligible(phase, params, labels, {},
                                  augment_cfg=_aug(policy='trivialaugment'))
  assert 'augment.policy' in reason
  assert 'mixing' in feature_cache.eligible(phase, params, labels, {},
                                            augment_cfg=_aug(cutmix_alpha=1.0))
  still = types.SimpleNamespace(**{**vars(phase), 'augment': False, 'cache_views': 0})
  assert feature_cache.eligible(still, params, labels, {},
                                augment_cfg=_aug(mixup_alpha=1.0)) is None
