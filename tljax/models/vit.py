"""Vision Transformers (ViT-S/16, ViT-B/16) laid out as timm and torchvision build them.

Both libraries compute the same network (pre-norm blocks, LayerNorm eps
1e-6, exact GELU, biases everywhere, a class token whose position embedding
is stored with the patches'), so one module serves ports from either:

  backbone/embed/proj (patch conv), embed/cls_token, embed/pos_embed
  backbone/block_{i}/norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2
  backbone/norm  (pool='token')  or  backbone/fc_norm  (pool='avg')
  head/logits

Everything lives in named direct children of the backbone so that
`trainable='top:N'` counts transformer blocks (the final norm has no kernel
and joins the last block). The backbone returns pooled, normalised features
[N, C]: `pool='token'` normalises every token and takes the class token;
`pool='avg'` (timm's `global_pool='avg'`) averages the patch tokens and then
applies `fc_norm`, with no final norm, exactly as timm does.

An input whose token grid differs from the stored grid (`img_size // patch`)
gets its patch position embeddings resampled at forward time, by the
reference library's own bicubic: `pos_resample='timm'` is timm's
`resample_abs_pos_embed` (torch's antialiased bicubic, which uses A = -0.5
and renormalised taps), `'torchvision'` is torchvision's
`interpolate_embeddings` (A = -0.75, align_corners=True). The class token's
embedding is never resampled.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  patch: int
  dim: int
  depth: int
  heads: int
  mlp: int
  img_size: int


SPECS = {
    'vit_s_16': ViTSpec(patch=16, dim=384, depth=12, heads=6, mlp=1536, img_size=224),
    'vit_b_16': ViTSpec(patch=16, dim=768, depth=12, heads=12, mlp=3072, img_size=224),
    'vit_tiny': ViTSpec(patch=8, dim=32, depth=3, heads=2, mlp=64, img_size=32),
}

INPUT_SIZES = {'default': 224, 'vit_tiny': 32}
POOLS = ('token', 'avg')
POS_RESAMPLE = ('timm', 'torchvision')
LN_EPS = 1e-6


def _cubic(x: float, a: float) -> float:
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


@functools.lru_cache(maxsize=64)
def resample_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
  """[n_out, n_in] weights of one axis of torch's bicubic resize (it is separable).

  'timm': `F.interpolate(mode='bicubic', antialias=True)` — timm's default;
  torch's antialiased kernel is PIL's (A = -0.5, widened when shrinking,
  taps renormalised at the borders). 'torchvision': `align_corners=True`,
  A = -0.75, edge indices clamped.
  """
  m = np.zeros((n_out, n_in), np.float64)
  if mode == 'timm':
    scale = n_in / n_out
    support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
    for i in range(n_out):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      w = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
      m[i, lo:hi] = w / w.sum()
  elif mode == 'torchvision':
    for i in range(n_out):
      src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
      base = math.floor(src)
      for k in range(-1, 3):
        m[i, min(max(base + k, 0), n_in - 1)] += _cubic(src - base - k, -0.75)
  else:
    raise ValueError(f'pos_resample must be one of {POS_RESAMPLE}, got {mode!r}')
  return m.astype(np.float32)


def resample_pos_embed(pos: jnp.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       mode: str) -> jnp.ndarray:
  """Patch position embeddings [1, gh*gw, C] resampled to `new_grid`, in float32."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  c = pos.shape[-1]
  grid = pos.astype(jnp.float32).reshape(old_grid[0], old_grid[1], c)
  mh = resample_matrix(old_grid[0], new_grid[0], mode)
  mw = resample_matrix(old_grid[1], new_grid[1], mode)
  out = jnp.einsum('ah,bw,hwc->abc', mh, mw, grid, precision='highest')
  return out.reshape(1, new_grid[0] * new_grid[1], c)


class PatchProj(nn.Module):
  """A stride-`patch` conv as one matmul over non-overlapping patches.

  The kernel is stored HWIO like `layers.Conv` (so torch's conv weight ports
  as any conv does); a reshape and an einsum are exact and cheaper than a
  strided convolution.
  """

  patch: int
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    p = self.patch
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.dim), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.dim,), jnp.float32)
    patches = x.reshape(n, h // p, p, w // p, p, c).astype(self.dtype)
    y = jnp.einsum('nhawbc,abcd->nhwd', patches, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class Embed(nn.Module):
  """Patch projection, class token and position embedding: tokens [N, 1 + gh*gw, C]."""

  patch: int
  dim: int
  grid: int
  pos_resample: str = 'timm'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, _ = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f'ViT input {h}x{w} is not a multiple of the patch size {p}; '
                       f'resize or crop it to a multiple of {p}.')
    tokens = PatchProj(p, self.dim, dtype=self.dtype, name='proj')(x)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.dim), jnp.float32)
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (1, 1 + self.grid * self.grid, self.dim), jnp.float32)
    patch_pos = resample_pos_embed(pos[:, 1:], (self.grid, self.grid), (h // p, w // p),
                                   self.pos_resample)
    tokens = tokens.reshape(n, -1, self.dim) + patch_pos.astype(self.dtype)
    cls = jnp.broadcast_to((cls + pos[:, :1]).astype(self.dtype), (n, 1, self.dim))
    return jnp.concatenate([cls, tokens], axis=1)


def layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm's `attn.qkv`, torchvision's
  `in_proj`): q, k, v are consecutive thirds of its output, heads consecutive slices of each."""

  dim: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, t, _ = x.shape
    hd = self.dim // self.heads
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(n, t, 3, self.heads, hd), 2, 0)
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k) / np.sqrt(hd).astype(np.float32)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    y = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, t, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, name='proj')(y)


class Mlp(nn.Module):
  hidden: int
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x), approximate=False)
    return nn.Dense(self.dim, dtype=self.dtype, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block; each residual branch has its own stochastic-depth drop."""

  spec: ViTSpec
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, active: bool = False):
    s = self.spec
    drop = lambda name: nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not active,
                                   name=name)
    y = Attention(s.dim, s.heads, dtype=self.dtype, name='attn')(layer_norm(self.dtype, 'norm1')(x))
    x = x + drop('drop_path1')(y)
    y = Mlp(s.mlp, s.dim, dtype=self.dtype, name='mlp')(layer_norm(self.dtype, 'norm2')(x))
    return x + drop('drop_path2')(y)


class ViT(nn.Module):
  """Embedding → blocks → pooled, normalised features [N, dim].

  `img_size` fixes the stored position-embedding grid; other inputs
  (multiples of the patch) resample it. Stochastic depth rises linearly from
  0 at the first block to `drop_path` at the last (timm's schedule) and is
  active when `stochastic` (default: `train`).
  """

  spec: ViTSpec
  pool: str = 'token'
  img_size: int = 224
  drop_path: float = 0.0
  pos_resample: str = 'timm'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    s = self.spec
    active = train if stochastic is None else stochastic
    x = Embed(s.patch, s.dim, self.img_size // s.patch, self.pos_resample, dtype=self.dtype,
              name='embed')(x)
    for i in range(s.depth):
      rate = self.drop_path * i / (s.depth - 1) if s.depth > 1 else self.drop_path
      x = Block(s, drop_path=rate, dtype=self.dtype, name=f'block_{i}')(x, active)
    if self.pool == 'avg':
      pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(self.dtype)
      return layer_norm(self.dtype, 'fc_norm')(pooled)
    return layer_norm(self.dtype, 'norm')(x[:, 0])


def build(name: str, dtype=jnp.float32, pool: str = 'token', img_size: int | None = None,
          drop_path: float = 0.0, pos_resample: str = 'timm'):
  """Returns (backbone, head defaults): the pooled features go straight into `logits`."""
  if name not in SPECS:
    raise ValueError(f'unknown ViT {name!r}; known: {", ".join(SPECS)}')
  spec = SPECS[name]
  if pool not in POOLS:
    raise ValueError(f"{name}: pool must be one of {POOLS} (timm's global_pool), got {pool!r}")
  if pos_resample not in POS_RESAMPLE:
    raise ValueError(f'{name}: pos_resample must be one of {POS_RESAMPLE}, got {pos_resample!r}')
  img_size = spec.img_size if img_size is None else int(img_size)
  if img_size <= 0 or img_size % spec.patch:
    raise ValueError(f'{name}: img_size must be a positive multiple of the patch size '
                     f'{spec.patch}, got {img_size}')
  if not 0.0 <= drop_path < 1.0:
    raise ValueError(f'{name}: drop_path must be in [0, 1), got {drop_path}')
  backbone = ViT(spec, pool=pool, img_size=img_size, drop_path=float(drop_path),
                 pos_resample=pos_resample, dtype=dtype)
  return backbone, dict(pool='avg', hidden=(), dropout=0.0)
