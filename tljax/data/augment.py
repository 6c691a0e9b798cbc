"""On-device augmentation and eval geometry, in JAX, run inside the jitted/pmapped step.

The host only ships uint8 crops of the cache; cropping, resizing, flipping,
rotation/zoom and colour jitter happen on the accelerator, so a 2-core host
can feed a GPU. Crop+resize is separable: each example gets two small
interpolation matrices (rows: output pixels, columns: source pixels; a
triangle filter widened when downscaling, i.e. antialiased like PIL) and the
resize is two batched matmuls, which XLA runs fast on CPU, GPU and TPU. A
horizontal flip is the x-matrix with its rows reversed. Rotation and zoom
(Keras `RandomRotation` / `RandomZoom`, reflect fill) need a general affine
map and use a bilinear gather, only when enabled.

Given the PRNG key the output is fully determined. All random parameters
of a batch come from one `jax.random.uniform(rng, (batch, NUM_DRAWS))` call,
a row per example: one threefry invocation instead of a dozen per example
keeps the compiled step small (compile time fell ~3x). Under pmap, fold the
device index into `rng` first or every device augments alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tljax.data.config import POLICIES
from tljax.data.preprocess import Preprocessing


def _interp_matrix(start, length, in_size: int, out_size: int):
  """[out, in] weights resampling source span [start, start+length) onto out_size pixels."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  src = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(centers[:, None] - src[None, :]) / support)
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def eval_box(load_size: int, preprocessing: Preprocessing):
  """(top, left, size, size) of the eval crop inside the square cache.

  'shorter': the cache is the shorter-side-resized centre square, so the
  torchvision centre crop is the central `input_size/resize` fraction of it;
  'exact': the cache already is the squashed whole image.
  """
  if preprocessing.resize_mode == 'exact':
    return 0.0, 0.0, float(load_size), float(load_size)
  side = load_size * preprocessing.input_size / preprocessing.resize
  offset = (load_size - side) / 2
  return offset, offset, side, side


def eval_transform(images, out_size: int, preprocessing: Preprocessing, dtype=jnp.float32):
  """uint8 [b, S, S, 3] → normalised [b, out, out, 3] by the backbone's eval geometry."""
  s = images.shape[1]
  top, left, side, _ = eval_box(s, preprocessing)
  x = images.astype(jnp.float32)
  if not (side == s and out_size == s):
    w = _interp_matrix(top, side, s, out_size)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum('oh,bhwc->bowc', w, x, precision=hp)
    x = jnp.einsum('pw,bowc->bopc', w, x, precision=hp)
  return preprocessing.normalize(x).astype(dtype)


NUM_DRAWS = 28
_ATTEMPTS = 10


def _random_box(u, s: int, scale, ratio):
  """torchvision RandomResizedCrop on an s×s image, from 22 uniforms, vectorised over attempts."""
  area = (scale[0] + u[:_ATTEMPTS] * (scale[1] - scale[0])) * s * s
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  log_r = lo + u[_ATTEMPTS:2 * _ATTEMPTS] * (hi - lo)
  aspect = jnp.exp(log_r)
  w = jnp.sqrt(area * aspect)
  h = jnp.sqrt(area / aspect)
  ok = (w <= s) & (h <= s)
  first = jnp.argmax(ok)
  fallback_w = s * ratio[1] if ratio[1] < 1 else float(s)
  fallback_h = s / ratio[0] if ratio[0] > 1 else float(s)
  w = jnp.where(ok.any(), w[first], fallback_w)
  h = jnp.where(ok.any(), h[first], fallback_h)
  top = u[2 * _ATTEMPTS] * (s - h)
  left = u[2 * _ATTEMPTS + 1] * (s - w)
  return top, left, h, w


def _reflect(u, size: int):
  """Half-sample symmetric reflection of pixel-centre coordinates (Keras 'reflect')."""
  period = 2.0 * size
  u = jnp.mod(u + 0.5, period)
  return jnp.where(u >= size, period - u, u) - 0.5


def _bilinear_gather(image, sy, sx):
  """Samples float image [S, S, C] at pixel-centre coordinates sy, sx [H, W] (edge-clamped)."""
  s = image.shape[0]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
  y0i, y1i = (jnp.clip(v, 0, s - 1).astype(jnp.int32) for v in (y0, y0 + 1))
  x0i, x1i = (jnp.clip(v, 0, s - 1).astype(jnp.int32) for v in (x0, x0 + 1))
  flat = image.reshape(s * s, -1)

  def tap(yi, xi):
    return jnp.take(flat, (yi * s + xi).reshape(-1), axis=0).reshape(*sy.shape, -1)

  top = tap(y0i, x0i) * (1 - wx) + tap(y0i, x1i) * wx
  bottom = tap(y1i, x0i) * (1 - wx) + tap(y1i, x1i) * wx
  return top * (1 - wy) + bottom * wy


def _affine_crop(image, box, out_size: int, flip, angle, zoom, reflect: bool):
  """One bilinear pass: crop `box`, resize to out_size, flip, then rotate/zoom about the centre.

  Rotation and zoom act on the resized output (as Keras layers after a
  resize do), with reflect fill at the output border; composing them with
  the crop means the image is interpolated once, not three times.
  """
  top, left, height, width = box
  c = (out_size - 1) / 2.0
  grid = jnp.arange(out_size, dtype=jnp.float32) - c
  yy, xx = jnp.meshgrid(grid, grid, indexing='ij')
  xx = jnp.where(flip, -xx, xx)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  qy = zoom * (cos * yy - sin * xx) + c
  qx = zoom * (sin * yy + cos * xx) + c
  if reflect:
    qy, qx = _reflect(qy, out_size), _reflect(qx, out_size)
  sy = top + (qy + 0.5) * (height / out_size) - 0.5
  sx = left + (qx + 0.5) * (width / out_size) - 0.5
  return _bilinear_gather(image, sy, sx)


def _colour_affine(u, mean_gray, brightness: float, contrast: float, saturation: float):
  """ColorJitter (brightness → contrast → saturation) folded into one affine colour map.

  Each factor is drawn as in torchvision, but the three steps compose to
  `y = M x + o` with a 3x3 `M`, applied in one pass with a single clip at the
  end (torchvision clips after each step; the difference only shows on
  saturated pixels). Contrast blends toward the mean gray of the cached
  image rather than of the crop, so no reduction over the sampled output is
  needed, which keeps XLA from recomputing the gather (measured 4x slower).
  """
  fb = 1 + brightness * (2 * u[0] - 1)
  fc = 1 + contrast * (2 * u[1] - 1)
  fs = 1 + saturation * (2 * u[2] - 1)
  gray_w = jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
  sat = fs * jnp.eye(3) + (1 - fs) * jnp.broadcast_to(gray_w, (3, 3))
  matrix = fb * fc * sat
  offset = jnp.full((3,), (1 - fc) * fb * mean_gray)
  return matrix, offset


def _apply_colour(x, matrix, offset):
  y = x[..., 0:1] * matrix[:, 0] + x[..., 1:2] * matrix[:, 1] + x[..., 2:3] * matrix[:, 2]
  return jnp.clip(y + offset, 0.0, 255.0)


def _one(u, image, aug_cfg, out_size: int, preprocessing: Preprocessing):
  """One example from its row `u` of NUM_DRAWS uniforms (layout: box 0–21, flip 22,
  rotation 23, zoom 24, colour 25–27)."""
  s = image.shape[0]
  if aug_cfg.get('random_resized_crop', True):
    box = _random_box(u, s, tuple(aug_cfg.get('scale', (0.08, 1.0))),
                      tuple(aug_cfg.get('ratio', (3 / 4, 4 / 3))))
  else:
    box = eval_box(s, preprocessing)
  flip = (u[22] < 0.5) if aug_cfg.get('flip', True) else False
  rotation, zoom = float(aug_cfg.get('rotation', 0.0)), float(aug_cfg.get('zoom', 0.0))
  angle = (2 * u[23] - 1) * math.radians(rotation)
  scale = 1.0 + (2 * u[24] - 1) * zoom
  x = _affine_crop(image.astype(jnp.float32), box, out_size, flip, angle, scale,
                   reflect=bool(rotation or zoom))
  b, c, sat = (float(aug_cfg.get(k, 0.0)) for k in ('brightness', 'contrast', 'saturation'))
  if b or c or sat:
    channel_means = jnp.mean(image.astype(jnp.float32), axis=(0, 1))
    mean_gray = jnp.dot(channel_means, jnp.asarray([0.299, 0.587, 0.114], jnp.float32))
    x = _apply_colour(x, *_colour_affine(u[25:28], mean_gray, b, c, sat))
  return x


def train_transform(rng, images, aug_cfg, out_size: int, preprocessing: Preprocessing,
                    dtype=jnp.float32):
  """uint8 [b, S, S, 3] → augmented, normalised [b, out, out, 3]; deterministic given `rng`.

  An op policy (RandAugment / TrivialAugment) runs after crop, flip and
  colour jitter on the [0, 255] image; its randomness comes from its own
  fold of `rng`, so the draws above (and the output with policy='none') are
  exactly what they were before policies existed.
  """
  draws = jax.random.uniform(rng, (images.shape[0], NUM_DRAWS))
  x = jax.vmap(lambda u, im: _one(u, im, aug_cfg, out_size, preprocessing))(draws, images)
  if aug_cfg.get('policy', 'none') != 'none':
    x = apply_policy(jax.random.fold_in(rng, _POLICY_STREAM), x, aug_cfg)
  return preprocessing.normalize(x).astype(dtype)


# --- Op policies: RandAugment (Cubuk et al. 2020) and TrivialAugment (Müller & Hutter 2021).

POLICY_OPS = ('identity', 'brightness', 'color', 'contrast', 'sharpness', 'posterize',
              'solarize', 'autocontrast', 'equalize', 'rotate', 'shear_x', 'shear_y',
              'translate_x', 'translate_y')
MAX_MAGNITUDE = 30                   # torchvision's 31 magnitude bins, 0..30
_GEOMETRIC = POLICY_OPS.index('rotate')
_POLICY_STREAM = 0x5EED_0A
_GRAY = (0.2989, 0.587, 0.114)       # torchvision rgb_to_grayscale

# Value of each op at the top bin; bin m gives m/30 of it (torchvision's linspace). Posterize:
# bits removed (8 → 4 / 8 → 2), solarize: how far the threshold falls from 255. Translations
# are fractions of the image side: RandAugment's is torchvision's 150/331, TrivialAugmentWide's
# 32 px is taken as 32/224 so it means the same at every input size.
_TOP = {
    'randaugment': (0, .9, .9, .9, .9, 4, 255, 0, 0, 30, .3, .3, 150 / 331, 150 / 331),
    'trivialaugment': (0, .99, .99, .99, .99, 6, 255, 0, 0, 135, .99, .99, 32 / 224, 32 / 224),
}
_SIGNED = (False, True, True, True, True, False, False, False, False, True, True, True, True, True)


def _blend(x, degenerate, factor):
  """torchvision's `_blend`: factor 1 is the image, 0 the degenerate one, clipped to [0, 255]."""
  return jnp.clip(factor * x + (1 - factor) * degenerate, 0.0, 255.0)


def _gray(x):
  return (x @ jnp.asarray(_GRAY, jnp.float32))[..., None]


def _sharpness(x, v):
  """Blend with a 3x3 smoothing of the interior (centre weight 5/13); the border stays as is."""
  h, w = x.shape[:2]
  pad = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode='edge')
  box = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3))
  smooth = (box + 4 * x) / 13
  yy, xx = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  interior = (yy > 0) & (yy < h - 1) & (xx > 0) & (xx < w - 1)
  return _blend(x, jnp.where(interior, smooth, x), 1 + v)


def _posterize(x, v):
  shift = 2.0 ** jnp.round(v)
  return jnp.where(v < 0.5, x, jnp.floor(x / shift) * shift)


def _solarize(x, v):
  return jnp.where(x >= 255.0 - v, 255.0 - x, x)


def _autocontrast(x, v):
  del v
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  flat = hi <= lo
  scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, hi - lo))
  return jnp.clip((x - jnp.where(flat, 0.0, lo)) * scale, 0.0, 255.0)


def _equalize_channel(x, q):
  """torchvision's uint8 equalize of one channel: a LUT from the cumulative histogram."""
  hist = jnp.bincount(q.reshape(-1), length=256)
  step = (q.size - hist[q.max()]) // 255
  lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
  lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
  return jnp.where(step == 0, x, lut[q].astype(jnp.float32))


def _equalize(x, v):
  del v
  q = jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(x, q)


def _warp(x, op, v):
  """Rotate (about the centre), shear (about the top-left pixel, as torchvision) or translate.

  The five geometric ops share one nearest-neighbour gather with constant 0
  fill (torchvision's defaults); only the 2x3 inverse map, on (row, col, 1),
  depends on the op. One gather instead of five matters because under vmap
  every branch of the op switch is evaluated for every image.
  """
  h, w = x.shape[:2]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  theta = jnp.deg2rad(v)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  one, zero = jnp.ones_like(v), jnp.zeros_like(v)
  maps = jnp.stack([
      jnp.stack([cos, -sin, cy - cos * cy + sin * cx, sin, cos, cx - sin * cy - cos * cx]),
      jnp.stack([one, zero, zero, -v, one, zero]),           # shear_x
      jnp.stack([one, -v, zero, zero, one, zero]),           # shear_y
      jnp.stack([one, zero, zero, zero, one, -v * w]),       # translate_x
      jnp.stack([one, zero, -v * h, zero, one, zero]),       # translate_y
  ])
  a = maps[op - _GEOMETRIC]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  sy = jnp.round(a[0] * yy + a[1] * xx + a[2])
  sx = jnp.round(a[3] * yy + a[4] * xx + a[5])
  inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
  flat = jnp.clip(sy, 0, h - 1).astype(jnp.int32) * w + jnp.clip(sx, 0, w - 1).astype(jnp.int32)
  out = jnp.take(x.reshape(h * w, -1), flat.reshape(-1), axis=0).reshape(x.shape)
  return jnp.where(inside[..., None], out, 0.0)


_BRANCHES = (
    lambda x, op, v: x,
    lambda x, op, v: _blend(x, 0.0, 1 + v),                          # brightness
    lambda x, op, v: _blend(x, _gray(x), 1 + v),                     # color (saturation)
    lambda x, op, v: _blend(x, jnp.mean(_gray(x)), 1 + v),           # contrast
    lambda x, op, v: _sharpness(x, v),
    lambda x, op, v: _posterize(x, v),
    lambda x, op, v: _solarize(x, v),
    lambda x, op, v: _autocontrast(x, v),
    lambda x, op, v: _equalize(x, v),
    _warp,
)


def policy_op(image, op, magnitude, sign=1.0, policy: str = 'randaugment'):
  """Op `op` (index into POLICY_OPS) at bin `magnitude` (0..30) on float [H, W, 3] in [0, 255].

  `sign` (±1) flips the direction of the ops torchvision draws a sign for;
  `policy` picks the magnitude space (TrivialAugment's is 'wide'). Traceable:
  op, magnitude and sign may be traced scalars.
  """
  op = jnp.asarray(op, jnp.int32)
  top = jnp.asarray(_TOP[policy], jnp.float32)[op]
  signed = jnp.asarray(_SIGNED)[op]
  v = top * (jnp.asarray(magnitude, jnp.float32) / MAX_MAGNITUDE)
  v = jnp.where(signed, v * jnp.asarray(sign, jnp.float32), v)
  return jax.lax.switch(jnp.minimum(op, _GEOMETRIC), _BRANCHES, image.astype(jnp.float32), op, v)


def apply_policy(key, images, aug_cfg):
  """float [b, H, W, 3] in [0, 255] → the same after each image's own policy ops.

  RandAugment: `policy_ops` ops drawn uniformly (with replacement) at bin
  `policy_magnitude`; TrivialAugment: one op at a uniform bin. Signs are
  fair coins. All draws come from one uniform call with a row per image.
  """
  policy = aug_cfg.get('policy', 'none')
  if policy == 'none':
    return images
  if policy not in _TOP:
    raise ValueError(f'augment.policy={policy!r} is unknown; use one of {", ".join(POLICIES)}')
  n = int(aug_cfg.get('policy_ops', 2)) if policy == 'randaugment' else 1
  u = jax.random.uniform(key, (images.shape[0], n, 3))
  ops = jnp.minimum(jnp.floor(u[..., 0] * len(POLICY_OPS)), len(POLICY_OPS) - 1).astype(jnp.int32)
  signs = jnp.where(u[..., 1] < 0.5, -1.0, 1.0)
  if policy == 'randaugment':
    bins = jnp.full(ops.shape, float(aug_cfg.get('policy_magnitude', 9)))
  else:
    bins = jnp.minimum(jnp.floor(u[..., 2] * (MAX_MAGNITUDE + 1)), MAX_MAGNITUDE)

  def one(x, rows):
    def body(x, row):
      return policy_op(x, *row, policy=policy), None
    return jax.lax.scan(body, x, rows)[0]
  return jax.vmap(one)(images.astype(jnp.float32), (ops, bins, signs))


# --- Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), batch-level, as timm mixes.


def mixing_enabled(cfg) -> bool:
  """True when `mix_batch` can change a batch (an alpha > 0 and mix_prob > 0)."""
  alphas = float(cfg.get('mixup_alpha', 0.0)) > 0 or float(cfg.get('cutmix_alpha', 0.0)) > 0
  return alphas and float(cfg.get('mix_prob', 1.0)) > 0


def _targets(labels, num_classes: int, label_smoothing: float):
  if num_classes == 1:
    t = labels.astype(jnp.float32)
    return t * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else t
  t = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return t * (1 - label_smoothing) + label_smoothing / num_classes if label_smoothing else t


def mix_batch(key, images, labels, num_classes: int, cfg, *, label_smoothing: float = 0.0):
  """(images [b, H, W, C], int labels [b]) → (mixed images, soft float32 targets).

  Each example is mixed with its partner in the reversed batch. Mixup blends
  whole images with λ ~ Beta(α, α); CutMix pastes the partner's box of area
  about 1 − λ and then sets λ to the area actually kept, after the box is
  clipped to the image. With both alphas > 0, CutMix is used with
  probability `mix_switch_prob`; a batch is mixed at all with probability
  `mix_prob`. Targets are λ·t + (1 − λ)·t_partner of the one-hot (or, for
  `num_classes=1`, the binary [b]) targets, smoothed first if asked, so the
  step can always use a soft-target loss. Jittable; one λ per batch.
  """
  targets = _targets(labels, num_classes, label_smoothing)
  if not mixing_enabled(cfg):
    return images, targets
  mixup_alpha = float(cfg.get('mixup_alpha', 0.0))
  cutmix_alpha = float(cfg.get('cutmix_alpha', 0.0))
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
  h, w = images.shape[1:3]
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < float(cfg.get('mix_switch_prob', 0.5))
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  if cutmix_alpha > 0:
    lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
    centre = jax.random.uniform(k_box, (2,)) * jnp.asarray([h, w], jnp.float32)
    half = jnp.sqrt(1 - lam) * jnp.asarray([h, w], jnp.float32) / 2
    lo = jnp.clip(jnp.round(centre - half), 0, jnp.asarray([h, w], jnp.float32))
    hi = jnp.clip(jnp.round(centre + half), 0, jnp.asarray([h, w], jnp.float32))
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= lo[0]) & (rows < hi[0]) & (cols >= lo[1]) & (cols < hi[1])
    lam_cutmix = 1 - jnp.prod(hi - lo) / (h * w)
    keep_cutmix = jnp.where(box, 0.0, 1.0)
  else:
    lam_cutmix, keep_cutmix = 1.0, jnp.ones((h, w))
  apply = jax.random.uniform(k_apply) < float(cfg.get('mix_prob', 1.0))
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
  keep = jnp.where(apply, jnp.where(use_cutmix, keep_cutmix, lam_mixup), 1.0)
  keep = keep.astype(images.dtype)[None, :, :, None]
  mixed = keep * images + (1 - keep) * images[::-1]
  return mixed, (lam * targets + (1 - lam) * targets[::-1]).astype(jnp.float32)
