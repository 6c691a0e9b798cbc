"""`tljax.predict` with the real EfficientNet-Lite0 weights, on every common kind of image file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tljax import labels, predict
from tljax.port import run_port
from tljax.porting.efficientnet_lite import shipped_weights_path

CAT_CLASSES = range(281, 286)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """chelsea in many encodings, plus a text file posing as a JPEG and a truncated JPEG."""
  d = tmp_path_factory.mktemp('images')
  cat = Image.fromarray(skimage.data.chelsea())
  paths = {}

  def save(name, image, **kw):
    paths[name] = str(d / name)
    image.save(paths[name], **kw)

  save('rgb.jpg', cat, quality=95)
  rgba = np.concatenate([np.asarray(cat), np.full(cat.size[::-1] + (1,), 255, np.uint8)], -1)
  rgba[:20, :, :] = (0, 0, 0, 0)  # transparent black band: must come out white, not black
  save('alpha.png', Image.fromarray(rgba, 'RGBA'))
  save('gray.png', cat.convert('L'))
  save('gray.jpg', cat.convert('L'))
  save('cmyk.jpg', cat.convert('CMYK'), quality=95)
  save('palette.png', cat.convert('P', palette=Image.ADAPTIVE))
  save('gray16.png', Image.fromarray(np.asarray(cat.convert('L')).astype(np.uint16) * 257))
  paths['not_image.jpg'] = str(d / 'not_image.jpg')
  with open(paths['not_image.jpg'], 'w') as f:
    f.write('this is not an image\n')
  with open(paths['rgb.jpg'], 'rb') as f:
    data = f.read()
  paths['truncated.jpg'] = str(d / 'truncated.jpg')
  with open(paths['truncated.jpg'], 'wb') as f:
    f.write(data[:len(data) // 2])
  return paths


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  """Ported the way a user does it: `tljax.port` on the shipped .pth."""
  out = str(tmp_path_factory.mktemp('weights') / 'lite0')
  run_port('efficientnet_lite', 'efficientnet_lite0', out, input_path=shipped_weights_path())
  return out


GOOD = ('rgb.jpg', 'alpha.png', 'gray.png', 'gray.jpg', 'cmyk.jpg', 'palette.png', 'gray16.png')


def test_every_image_kind_is_a_cat(images, weights_dir):
  predictor = predict.Predictor(*predict.load_for_inference(weights_dir))
  results = predictor.predict_files([images[n] for n in GOOD], k=5)
  for name, result in zip(GOOD, results):
    preds = result['predictions']
    assert len(preds) == 5 and preds[0]['index'] in CAT_CLASSES, (name, preds)
    assert preds[0]['label'] == labels.imagenet1k()[preds[0]['index']]
    probs = [p['probability'] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_decoding_conventions(images):
  alpha = np.asarray(predict.decode_image(images['alpha.png']))
  assert alpha.shape == (300, 451, 3) and np.all(alpha[:20] == 255)  # composited on white
  plain = np.asarray(Image.open(images['gray.png']).convert('RGB'), np.int16)
  sixteen = np.asarray(predict.decode_image(images['gray16.png']), np.int16)
  assert np.abs(sixteen - plain).max() <= 1  # 16-bit scaled to 8-bit, not clipped
  rgb = np.asarray(predict.decode_image(images['rgb.jpg']), np.float32)
  cmyk = np.asarray(predict.decode_image(images['cmyk.jpg']), np.float32)
  assert np.abs(cmyk - rgb).mean() < 8  # colours survive the CMYK round trip


@pytest.mark.parametrize('name,reason', [('not_image.jpg', 'not an image file'),
                                         ('truncated.jpg', 'truncated'),
                                         ('missing.jpg', 'no such file')])
def test_unreadable_file_is_one_line_naming_it(images, name, reason):
  path = images.get(name, os.path.join(os.path.dirname(images['rgb.jpg']), name))
  with pytest.raises(predict.ImageError) as e:
    predict.decode_image(path)
  message = str(e.value)
  assert message.startswith(path) and reason in message and '\n' not in message


def test_cli_reports_bad_files_and_still_predicts_good_ones(images, weights_dir):
  cmd = [sys.executable, '-m', 'tljax.predict', f'--weights={weights_dir}', '--json', '--topk=3',
         f'--image={images["rgb.jpg"]}', f'--image={images["not_image.jpg"]}',
         f'--image={images["truncated.jpg"]}', f'--image={images["alpha.png"]}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'device_count' not in f)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 2
  assert images['not_image.jpg'] in errors[0] and images['truncated.jpg'] in errors[1]
  out = json.loads(proc.stdout)
  assert out['arch'] == 'efficientnet_lite0'
  results = out['results']
  order = ('rgb.jpg', 'not_image.jpg', 'truncated.jpg', 'alpha.png')
  assert [r['image'] for r in results] == [images[n] for n in order]
  assert 'error' in results[1] and 'error' in results[2]
  for r in (results[0], results[3]):
    assert len(r['predictions']) == 3 and r['predictions'][0]['index'] in CAT_CLASSES


def test_text_output_and_bad_weights_dir(images, weights_dir, tmp_path, capsys):
  paths = [images[n] for n in GOOD]  # the batch shape of test_every_image_kind: no recompile
  assert predict.run(weights_dir, paths, topk=2) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3 * len(paths) and lines[0::3] == paths
  cat_words = {'tabby', 'tiger', 'Persian', 'Siamese', 'Egyptian'}
  assert all(line.split()[1] in cat_words for line in lines[1::3])
  assert predict.run(str(tmp_path), [images['rgb.jpg']]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: cannot load weights {tmp_path}') and 'tljax.port' in err


def test_binary_head_uses_sigmoid():
  probs = predict.probabilities(np.array([[0.0], [2.0]]))
  np.testing.assert_allclose(probs[:, 1], [0.5, 1 / (1 + np.exp(-2.0))])
  np.testing.assert_allclose(probs.sum(-1), 1.0)
  np.testing.assert_allclose(predict.probabilities(np.array([[1.0, 1.0]])), [[0.5, 0.5]])


def test_labels():
  names = labels.imagenet1k()
  assert len(names) == len(set(names)) == 1000
  assert (names[0], names[281], names[967], names[999]) == ('tench', 'tabby', 'espresso',
                                                            'toilet tissue')
  assert labels.resolve('imagenet1k', 1000) == names
  assert labels.resolve(['cat', 'dog'], 1) == ['cat', 'dog']  # binary head: two names
  assert labels.resolve(None, 3) == ['class_0', 'class_1', 'class_2']
  with pytest.raises(ValueError, match='2 label names for a 3-class head'):
    labels.resolve(['a', 'b'], 3)
  with pytest.raises(ValueError, match='unknown label set'):
    labels.resolve('imagenet21k')
