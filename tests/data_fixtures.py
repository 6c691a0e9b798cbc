"""Builders for on-disk test datasets: Kaggle layouts and a zoo of bad image files.

Images are tiny and class-coloured so a test can check that a label really
belongs to its pixels after decoding.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 200, 20), (200, 40, 200)]


def class_image(label: int, index: int, size=(20, 14)) -> np.ndarray:
  """A class-coloured image with a little per-index variation (so no two are identical)."""
  w, h = size
  img = np.zeros((h, w, 3), np.uint8)
  img[:] = COLOURS[label % len(COLOURS)]
  img[index % h, :, :] = (index * 37) % 256
  return img


def write_class_dir(path: str, label: int, count: int, *, start: int = 0, ext: str = '.jpg'):
  os.makedirs(path, exist_ok=True)
  for i in range(start, start + count):
    fmt = 'PNG' if ext == '.png' else 'JPEG'
    Image.fromarray(class_image(label, i)).save(os.path.join(path, f'img_{i:03d}{ext}'),
                                                format=fmt, quality=95)


def png16_rgb(arr16: np.ndarray) -> bytes:
  """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
  h, w, _ = arr16.shape

  def chunk(tag, data):
    return (struct.pack('>I', len(data)) + tag + data +
            struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))

  raw = b''.join(b'\x00' + arr16[i].astype('>u2').tobytes() for i in range(h))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)) +
          chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


# name → (expected outcome, reason/note fragment)
ZOO = {
    'zero.jpg': ('skip', 'empty file'),
    'text.jpg': ('skip', 'not a decodable image'),
    'truncated.jpg': ('skip', 'truncated'),
    'truncated.png': ('skip', 'truncated'),
    'gray.jpg': ('convert', 'L converted'),
    'cmyk.jpg': ('convert', 'CMYK converted'),
    'alpha.png': ('convert', 'alpha composited'),
    'palette.png': ('convert', 'P converted'),
    'gray16.png': ('convert', 'high bit depth'),
    'rgb16.png': ('ok', ''),
    'png_named.jpg': ('convert', 'content is PNG'),
}


def write_zoo(path: str, label: int) -> None:
  """One file per bad-file kind, all derived from a class-coloured image."""
  os.makedirs(path, exist_ok=True)
  arr = class_image(label, 99, size=(24, 18))
  p = lambda name: os.path.join(path, name)  # noqa: E731
  open(p('zero.jpg'), 'wb').close()
  with open(p('text.jpg'), 'w') as fh:
    fh.write('this is not an image')
  Image.fromarray(arr).save(p('_full.jpg'), quality=95)
  data = open(p('_full.jpg'), 'rb').read()
  open(p('truncated.jpg'), 'wb').write(data[:len(data) // 2])
  os.remove(p('_full.jpg'))
  Image.fromarray(arr).save(p('_full.png'))
  data = open(p('_full.png'), 'rb').read()
  open(p('truncated.png'), 'wb').write(data[:len(data) // 2])
  os.remove(p('_full.png'))
  Image.fromarray(arr).convert('L').save(p('gray.jpg'))
  Image.fromarray(arr).convert('CMYK').save(p('cmyk.jpg'), quality=95)
  Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])).save(p('alpha.png'))
  Image.fromarray(arr).convert('P').save(p('palette.png'))
  Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(p('gray16.png'))
  open(p('rgb16.png'), 'wb').write(png16_rgb(arr.astype(np.uint16) * 257))
  Image.fromarray(arr).save(p('png_named.jpg'), format='PNG')
  open(p('.DS_Store'), 'wb').write(b'\x00\x01junk')


def monkeys(root: str, per_class=(6, 3), num_classes: int = 3, nested: bool = True) -> str:
  """10 Monkey Species layout: training/training/n*/, validation/validation/n*/, labels file."""
  for split, count in zip(('training', 'validation'), per_class):
    base = os.path.join(root, split, split) if nested else os.path.join(root, split)
    for c in range(num_classes):
      write_class_dir(os.path.join(base, f'n{c}'), c, count, start=0 if split == 'training' else 50)
  rows = ['Label,  Latin Name           , Common Name                   , Train Images , '
          'Validation Images']
  common = ['mantled_howler', 'patas_monkey', 'bald_uakari', 'japanese_macaque', 'pygmy_marmoset']
  for c in range(num_classes):
    rows.append(f'n{c}   , latin_{c}\t, {common[c]:<30}, {per_class[0]:<12}, {per_class[1]}')
  with open(os.path.join(root, 'monkey_labels.txt'), 'w') as fh:
    fh.write('\n'.join(rows) + '\n')
  return root


def animals10(root: str, counts: dict[str, int]) -> str:
  """Animals-10 layout: flat Italian class folders."""
  for c, (name, count) in enumerate(counts.items()):
    write_class_dir(os.path.join(root, name), c, count)
  return root


def folder_config(root, **kw):
  """The data config of an image-folder source at `root` (2 decode threads), with `kw` set."""
  from tljax.data.config import default_data_config
  cfg = default_data_config()
  cfg.source = 'folder'
  cfg.root = str(root)
  cfg.decode_threads = 2
  cfg.update(kw)
  return cfg
