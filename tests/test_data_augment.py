"""On-device augmentation: determinism, shapes, geometry against PIL, flips, crops, rotation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tljax.data import augment, default_augment_config
from tljax.data.config import validate_augment_config
from tljax.data.decode import decode
from tljax.data.preprocess import KERAS_TF, Preprocessing, resize_and_crop

SPEC = Preprocessing(input_size=28, resize=32)      # torchvision geometry, scaled down


def _images(b=6, s=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, s, s, 3), dtype=np.uint8)


def _smooth(w=80, h=60):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([xx / w * 255, yy / h * 255, 128 + 100 * np.sin(xx / 9) * np.cos(yy / 7)], -1)
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _denorm(x, spec):
  return np.asarray(x) * np.asarray(spec.std) + np.asarray(spec.mean)


def _aug(**kw):
  cfg = default_augment_config()
  cfg.update(kw)
  validate_augment_config(cfg)
  return cfg


def test_train_transform_deterministic_per_key_and_per_example():
  cfg = _aug(rotation=15.0, zoom=0.1, brightness=0.2, contrast=0.2, saturation=0.2)
  f = jax.jit(lambda k, x: augment.train_transform(k, x, cfg, 24, SPEC))
  same = np.repeat(_images(1), 6, axis=0)
  a = np.asarray(f(jax.random.key(1), same))
  b = np.asarray(f(jax.random.key(1), same))
  c = np.asarray(f(jax.random.key(2), same))
  assert a.shape == (6, 24, 24, 3) and a.dtype == np.float32
  assert np.array_equal(a, b)
  assert not np.allclose(a, c)
  assert len({a[i].tobytes() for i in range(6)}) == 6        # each example its own draw
  pixels = _denorm(a, SPEC)
  assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3  # colour jitter clips to 0..255
  bf16 = jax.jit(lambda k, x: augment.train_transform(k, x, cfg, 24, SPEC, dtype=jnp.bfloat16))
  assert bf16(jax.random.key(1), same).dtype == jnp.bfloat16


def test_eval_exact_identity_and_normalisation():
  x = _images()
  out = np.asarray(augment.eval_transform(x, 32, KERAS_TF))
  np.testing.assert_allclose(out, (x.astype(np.float32) - 127.5) / 127.5, atol=1e-6)


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('out_size', [28, 20])
@pytest.mark.parametrize('size,tol', [((96, 64), 0.05), ((80, 60), 4.0)])
def test_eval_shorter_geometry_matches_pil_resize_then_centre_crop(out_size, size, tol,
                                                                   interpolation):
  """Cache (shorter side → 32, centre square) + on-device centre crop 28/32 = torchvision eval.

  96x64 has integral resize/crop offsets: exact up to float error. 80x60 does
  not, and PIL's reference rounds its resize width and crop offset to whole
  pixels (a 1/3 px shift), so only the mean error is bounded. The cache is
  resized with the spec's interpolation (EfficientNet-Lite uses bicubic).
  """
  spec = Preprocessing(input_size=28, resize=32, interpolation=interpolation)
  img = _smooth(*size)
  cache = decode(_png_bytes(img), 32, 'shorter', name='x.png', resample=interpolation).image
  ours = _denorm(jax.jit(lambda v: augment.eval_transform(v, out_size, spec))(cache[None])[0],
                 spec)
  ref = resize_and_crop(img, spec).astype(np.float32)           # PIL: resize 32, crop 28
  if out_size != 28:
    ref = np.asarray(Image.fromarray(np.round(ref).astype(np.uint8)).resize(
        (out_size, out_size), Image.BILINEAR), np.float32)
    tol = max(tol, 0.6)                                          # PIL rounds to uint8
  assert np.abs(ours - ref).mean() < tol


def _png_bytes(img):
  import io
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  return buf.getvalue()


def test_flip_only_gives_eval_image_or_its_mirror():
  x = _images(16)
  cfg = _aug(random_resized_crop=False, flip=True)
  out = np.asarray(jax.jit(lambda k, v: augment.train_transform(k, v, cfg, 28, SPEC))(
      jax.random.key(0), x))
  ref = np.asarray(jax.jit(lambda v: augment.eval_transform(v, 28, SPEC))(x))
  flipped = [np.allclose(o, r[:, ::-1], atol=1e-4) for o, r in zip(out, ref)]
  plain = [np.allclose(o, r, atol=1e-4) for o, r in zip(out, ref)]
  assert all(f or p for f, p in zip(flipped, plain))
  assert any(flipped) and any(plain)


def test_full_area_crop_without_flip_is_identity():
  x = _images()
  cfg = _aug(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
  out = np.asarray(jax.jit(lambda k, v: augment.train_transform(k, v, cfg, 32, KERAS_TF))(
      jax.random.key(3), x))
  np.testing.assert_allclose(_denorm(out, KERAS_TF), x, atol=1e-3)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
  u = jax.random.uniform(jax.random.key(0), (2000, augment.NUM_DRAWS))
  box = jax.jit(jax.vmap(lambda r: augment._random_box(r, 100, (0.2, 0.6), (0.75, 4 / 3))))
  top, left, h, w = box(u)
  top, left, h, w = map(np.asarray, (top, left, h, w))
  area = h * w / 100 ** 2
  assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4
  assert (w / h).min() >= 0.75 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
  assert top.min() >= 0 and left.min() >= 0
  assert (top + h).max() <= 100 + 1e-3 and (left + w).max() <= 100 + 1e-3
  assert area.std() > 0.05 and top.std() > 5                     # actually random


def test_rotation_by_quarter_turn_and_zoom_in():
  x = _images(1, 16)[0].astype(np.float32)
  box = (0.0, 0.0, 16.0, 16.0)
  sample = jax.jit(
      lambda v, angle, zoom: augment._affine_crop(v, box, 16, False, angle, zoom, True))
  rot = np.asarray(sample(x, math.pi / 2, 1.0))
  assert any(np.allclose(rot, np.rot90(x, k, axes=(0, 1)), atol=1e-3) for k in (1, 3))
  zoom_in = np.asarray(sample(x, 0.0, 0.5))
  # zoom 0.5 about the centre 7.5: output pixel 8 samples source (7.75, 7.75)
  expected = (0.0625 * x[7, 7] + 0.1875 * x[7, 8] + 0.1875 * x[8, 7] + 0.5625 * x[8, 8])
  np.testing.assert_allclose(zoom_in[8, 8], expected, atol=1e-3)
  zoom_out = np.asarray(sample(x, 0.0, 2.0))
  assert np.isfinite(zoom_out).all() and zoom_out.min() >= 0 and zoom_out.max() <= 255


def test_runs_inside_pmap_with_per_device_keys():
  d = 2
  cfg = _aug()
  x = _images(4, 16).reshape(d, 2, 16, 16, 3)

  def step(rng, images):
    rng = jax.random.fold_in(rng, jax.lax.axis_index('batch'))
    return augment.train_transform(rng, images, cfg, 12, SPEC)

  out = jax.pmap(step, axis_name='batch', in_axes=(None, 0),
                 devices=jax.local_devices()[:d])(jax.random.key(0), np.repeat(x[:1], d, 0))
  assert out.shape == (d, 2, 12, 12, 3)
  assert not np.allclose(out[0], out[1])                       # devices draw differently


def test_augment_config_validation():
  with pytest.raises(ValueError, match='augment.scale'):
    _aug(scale=(0.5, 0.1))
  with pytest.raises(ValueError, match='augment.rotation'):
    _aug(rotation=400.0)
