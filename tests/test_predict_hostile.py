"""`tljax.predict` against hostile inputs: huge images, NaN weights, wrong arch, bad flags.

Exports are written with `weights_io.save_weights` from abstract shapes
(`jax.eval_shape`), so no test pays for an init; each failure must be one
`error:` line, never a traceback.
"""

import json
import os
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tljax import components, models, predict
from tljax.data import decode
from tljax.data.preprocess import Preprocessing
from tljax.porting import weights_io

SPEC = Preprocessing(input_size=32, resize=36)


def _export(path, arch: str, *, meta_arch: str | None = None, fill: float = 0.0) -> str:
  model = models.create(arch, 3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: np.full(s.shape, fill, s.dtype), dict(shapes))
  weights_io.save_weights(str(path), variables, {
      'arch': meta_arch or arch, 'source': 'test', 'num_classes': 3,
      'preprocessing': SPEC.to_json(), 'labels': ['a', 'b', 'c']})
  return str(path)


def _huge_png(path, width: int, height: int) -> str:
  """A valid 1-bit PNG of width x height, written row by row (PIL would allocate it all)."""
  def chunk(tag, data):
    return (struct.pack('>I', len(data)) + tag + data +
            struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))
  packer, row = zlib.compressobj(9), b'\x00' * (1 + (width + 7) // 8)
  idat = b''.join(packer.compress(row) for _ in range(height)) + packer.flush()
  with open(path, 'wb') as fh:
    fh.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 1, 0, 0,
                                                               0, 0)) +
             chunk(b'IDAT', idat) + chunk(b'IEND', b''))
  return str(path)


@pytest.fixture(scope='module')
def image(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('img') / 'x.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(path)
  return path


def _strict_json(text: str):
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(text, parse_constant=reject)


def test_144_megapixel_image_is_refused_like_training_refuses_it(tmp_path):
  path = _huge_png(tmp_path / 'huge.png', 12_000, 12_000)
  trained = decode.decode(path, 8)
  assert trained.error and '144 megapixels' in trained.error
  with pytest.raises(predict.ImageError) as e:
    predict.decode_image(path)
  message = str(e.value)
  assert message.startswith(path) and '144 megapixels' in message and '\n' not in message
  assert f'{decode.MAX_PIXELS / 1e6:.1f}-megapixel limit' in message


def test_the_limit_is_the_training_decoders(tmp_path, monkeypatch):
  path = str(tmp_path / 'small.png')
  Image.new('RGB', (200, 100)).save(path)
  monkeypatch.setattr(decode, 'MAX_PIXELS', 19_999)
  assert 'too large' in decode.decode(path, 8).error
  with pytest.raises(predict.ImageError, match='too large'):
    predict.decode_image(path)
  monkeypatch.setattr(decode, 'MAX_PIXELS', 20_000)
  assert decode.decode(path, 8).error is None
  assert predict.decode_image(path).size == (200, 100)


def test_nan_weights_are_refused_at_load_in_one_line(tmp_path, image, capsys):
  weights = _export(tmp_path / 'nan', 'simple_cnn_tiny', fill=np.nan)
  assert predict.run(weights, [image], topk=2, as_json=True) != 0
  captured = capsys.readouterr()
  assert captured.out == ''
  errors = captured.err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith('error:') and 'non-finite' in errors[0]


def test_overflowing_outputs_exit_nonzero_with_strict_json(tmp_path, image, capsys):
  weights = _export(tmp_path / 'huge', 'simple_cnn_tiny', fill=1e30)   # finite, logits overflow
  assert predict.run(weights, [image], topk=2, as_json=True) == 1
  captured = capsys.readouterr()
  out = _strict_json(captured.out)
  result = out['results'][0]
  assert result['non_finite'] is True
  assert [p['probability'] for p in result['predictions']] == [None, None]
  errors = captured.err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith('error:')
  assert 'non-finite' in errors[0] and 'diverged' in errors[0] and 'retrain' in errors[0]
  assert predict.run(weights, [image], topk=2) == 1
  assert 'nan' in capsys.readouterr().out


def test_finite_weights_say_so_in_json(tmp_path, image, capsys):
  weights = _export(tmp_path / 'zeros', 'simple_cnn_tiny')
  assert predict.run(weights, [image], topk=3, as_json=True) == 0
  result = _strict_json(capsys.readouterr().out)['results'][0]
  assert result['non_finite'] is False
  assert sum(p['probability'] for p in result['predictions']) == pytest.approx(1.0)


def test_wrong_arch_in_metadata_is_one_line_naming_both(tmp_path, image, capsys):
  weights = _export(tmp_path / 'mis', 'resnet_tiny', meta_arch='mobilenet_tiny')
  assert predict.run(weights, [image]) == 1
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and err.startswith(f'error: cannot load weights {weights}')
  assert "'resnet_tiny' weights" in err and "arch 'mobilenet_tiny'" in err
  assert '"arch": "resnet_tiny"' in err


def test_unhashable_module_still_predicts(tmp_path, image, capsys):
  """The torchvision MobileNets hold lists, which jit's static arguments cannot hash."""
  weights = _export(tmp_path / 'mobilenet', 'mobilenet_tiny')
  assert predict.run(weights, [image], topk=1) == 0
  assert capsys.readouterr().out.splitlines()[0] == image


def test_training_refuses_weights_of_another_arch(tmp_path):
  weights = _export(tmp_path / 'resnet', 'resnet_tiny')
  config = _pretrained_config(weights, 'mobilenet_tiny')
  with pytest.raises(ValueError) as e:
    components.pretrained_weights(config)
  message = str(e.value)
  assert '\n' not in message and "'resnet_tiny'" in message and "'mobilenet_tiny'" in message
  assert '--config.model.name=resnet_tiny' in message
  variables, meta = components.pretrained_weights(_pretrained_config(weights, 'resnet_tiny'))
  assert meta['arch'] == 'resnet_tiny' and 'params' in variables


def _pretrained_config(path: str, arch: str):
  import ml_collections
  return ml_collections.ConfigDict({'pretrained': {'source': 'dir', 'path': path},
                                    'model': {'name': arch}})


def test_cli_usage_errors_exit_2_without_traceback(tmp_path, image):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for args, expected in ((['--imag=x.jpg', '--weights=w'], "Unknown command line flag 'imag'"),
                         (['--weights=w'], 'need --weights=DIR and at least one --image')):
    proc = subprocess.run([sys.executable, '-m', 'tljax.predict', *args], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, (args, proc.stderr)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith('error: ') and expected in proc.stderr
