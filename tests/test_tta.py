"""Test-time augmentation: view geometry, probability averaging, evaluate and predict.

A stub module returning one pixel of its input as logits makes every view's
logits readable by hand, so the averaging is checked against numpy, and a
ramp image makes every crop's position readable from its pixel values.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tljax import models, predict, steps, tta
from tljax.data import augment
from tljax.data.preprocess import Preprocessing
from tljax.porting import weights_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PP = Preprocessing(input_size=32, resize=37)       # the tiny configs' geometry, cache 40
RAW = Preprocessing(input_size=4, resize=8, mean=(0.0,) * 3, std=(1.0,) * 3)
SOFT = Preprocessing(input_size=4, resize=8, mean=(40.0, 103.0, 205.0), std=(5.0, 1.0, 1.0))


class Pixel(nn.Module):
  """Logits = `scale` × the input's pixel (row, col): a model whose outputs a test can compute."""
  row: int = 0
  col: int = 0
  outputs: int = 3

  @nn.compact
  def __call__(self, x, train=False, bn_train=None, stochastic=None):
    scale = self.param('scale', nn.initializers.constant(0.5), ())
    return scale * x[:, self.row, self.col, :self.outputs]


def _images(n=4, size=40, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8))


def _ramp(size=8):
  """uint8 [1, size, size, 3]: channel 0 = 10·row + col, so any crop says where it came from."""
  r, c = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  image = np.stack([10 * r + c, 100 + r, 200 + c], -1).astype(np.uint8)
  return jnp.asarray(image[None])


def _run(apply, variables, images, train=False):
  fn = jax.jit(lambda v, x: apply(v['params'], v.get('batch_stats', {}), {'image': x}, None,
                                  (None, None), train)[0])
  return np.asarray(fn(variables, images))


def _log_mean_softmax(view_logits):
  z = np.asarray(view_logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  return np.log((p / p.sum(-1, keepdims=True)).mean(0))


@pytest.fixture(scope='module')
def cnn():
  model = models.create('simple_cnn_tiny', 3)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_modes_are_the_config_registry():
  assert tta.MODES == {'none': 1, 'flip': 2, 'five_crop': 5, 'ten_crop': 10}
  for mode, n in tta.MODES.items():
    assert len(tta.view_transforms(mode, 32, PP)) == n
  with pytest.raises(ValueError, match="unknown TTA mode 'mirror'.*flip"):
    tta.view_transforms('mirror', 32, PP)


def test_none_is_the_plain_eval_apply_bit_identically(cnn):
  model, variables = cnn
  images = _images()
  plain = steps.on_images(model, lambda key, x: augment.eval_transform(x, 32, PP))
  expected = _run(plain, variables, images)
  got = _run(tta.on_images(model, 'none', 32, PP, 'softmax'), variables, images)
  assert got.dtype == expected.dtype and np.array_equal(got, expected)
  # five_crop's centre view (index 4) is the eval view too, bit for bit.
  centre = tta.view_transforms('five_crop', 32, PP)[4](images)
  assert np.array_equal(np.asarray(centre), np.asarray(augment.eval_transform(images, 32, PP)))


def test_flip_views_are_the_eval_view_and_its_mirror():
  images = _images()
  view, mirror = tta.view_transforms('flip', 32, PP)
  eval_view = np.asarray(augment.eval_transform(images, 32, PP))
  assert np.array_equal(np.asarray(view(images)), eval_view)
  assert np.array_equal(np.asarray(mirror(images)), eval_view[:, :, ::-1])
  # The eval box is centred, so mirroring the view is viewing the mirrored image.
  mirrored_image = np.asarray(augment.eval_transform(images[:, :, ::-1], 32, PP))
  np.testing.assert_allclose(np.asarray(mirror(images)), mirrored_image, atol=1e-4)


def test_flip_of_a_mirror_symmetric_image_changes_nothing(cnn):
  model, variables = cnn
  half = np.asarray(_images(size=40))[:, :, :20]
  symmetric = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], axis=2))
  none = _run(tta.on_images(model, 'none', 32, PP, 'softmax'), variables, symmetric)
  flip = _run(tta.on_images(model, 'flip', 32, PP, 'softmax'), variables, symmetric)
  log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(none), -1))
  np.testing.assert_allclose(flip, log_p, atol=1e-5)
  # Not vacuous: the same image upside down (not a symmetry) does change the logits.
  upside_down = _run(tta.on_images(model, 'none', 32, PP, 'softmax'), variables,
                     symmetric[:, ::-1])
  assert np.abs(upside_down - none).max() > 1e-3


def test_five_crop_takes_the_corners_and_centre_of_the_cache():
  ramp = _ramp()
  views = [np.asarray(v(ramp))[0] for v in tta.view_transforms('ten_crop', 4, RAW)]
  image = np.asarray(ramp, np.float32)[0]
  corners = [image[:4, :4], image[:4, 4:], image[4:, :4], image[4:, 4:], image[2:6, 2:6]]
  for i, crop in enumerate(corners):
    assert np.array_equal(views[i], crop), i
    assert np.array_equal(views[5 + i], crop[:, ::-1]), i
  assert views[1][0, 0, 0] == 4 and views[2][0, 0, 0] == 40 and views[3][-1, -1, 0] == 77


def test_crops_keep_the_eval_scale_when_the_cache_is_not_the_resize_side():
  """Cache 40, resize 37: each crop spans the eval box's 34.6 pixels, not 32 (torchvision's
  Resize(37) + FiveCrop(32), seen at the cache's scale)."""
  side = tta.crop_side(40, PP)
  assert side == pytest.approx(40 * 32 / 37)
  ramp = _ramp(40)
  raw = Preprocessing(input_size=32, resize=37, mean=(0.0,) * 3, std=(1.0,) * 3)
  top_left = np.asarray(tta.view_transforms('five_crop', 32, raw)[0](ramp))[0, :, :, 2]
  # The last output column samples around source column side·(31.5/32) − 0.5, not column 31.
  assert top_left[0, -1] - 200 == pytest.approx(side * 31.5 / 32 - 0.5, abs=0.2)


def test_corners_equal_to_the_centre_are_warned_once():
  tta._warned.clear()
  pp = Preprocessing(input_size=8, resize=8)
  images = _images(n=1, size=8)
  with pytest.warns(UserWarning, match='corner crops equal the centre crop'):
    views = [np.asarray(v(images)) for v in tta.view_transforms('five_crop', 8, pp)]
  assert all(np.array_equal(v, views[4]) for v in views)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    tta.view_transforms('five_crop', 8, pp)[0](images)   # said once already
    tta.view_transforms('five_crop', 32, PP)[0](_images(n=1))   # a real five-crop: silent
  assert not [w for w in caught if 'corner crops' in str(w.message)]


@pytest.mark.parametrize('mode', ['flip', 'five_crop', 'ten_crop'])
def test_logits_are_the_log_of_the_mean_softmax_over_views(mode):
  stub = Pixel(row=3, col=5)
  variables = stub.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = _images()
  per_view = [0.5 * np.asarray(v(images))[:, 3, 5, :] for v in tta.view_transforms(mode, 32, PP)]
  expected = _log_mean_softmax(per_view)
  got = _run(tta.on_images(stub, mode, 32, PP, 'softmax'), variables, images)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # eval_step reads the averaged probabilities off these logits unchanged.
  labels = jnp.asarray([0, 1, 2, 0])
  state = steps.TrainState(params=variables['params'], batch_stats={}, opt_state=None,
                           step=jnp.zeros(()), rng=None)
  out = steps.eval_step(state, {'image': images, 'label': labels},
                        apply_fn=tta.on_images(stub, mode, 32, PP, 'softmax'), loss_kind='softmax')
  mean_p = np.exp(expected)
  np.testing.assert_allclose(out['confidence'], mean_p.max(-1), rtol=1e-5)
  np.testing.assert_allclose(out['loss'], -np.log(mean_p[np.arange(4), labels]), rtol=1e-4)
  assert np.array_equal(out['pred'], mean_p.argmax(-1))


def test_a_sigmoid_head_averages_sigmoid_probabilities():
  stub = Pixel(row=0, col=0, outputs=1)
  variables = stub.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = _images()
  per_view = np.stack([0.5 * np.asarray(v(images), np.float64)[:, 0, 0, :1]
                       for v in tta.view_transforms('ten_crop', 32, PP)])
  p = (1 / (1 + np.exp(-per_view))).mean(0)
  got = _run(tta.on_images(stub, 'ten_crop', 32, PP, 'sigmoid'), variables, images)
  np.testing.assert_allclose(got, np.log(p / (1 - p)), atol=1e-4)
  # Saturated views stay finite: p̄ rounds to 1 in float32, its logit does not overflow.
  huge = jnp.stack([jnp.full((2, 1), 300.0), jnp.full((2, 1), 200.0)])
  assert np.all(np.isfinite(np.asarray(tta.average_logits(huge, 'sigmoid'))))
  assert np.asarray(tta.average_logits(-huge, 'sigmoid')).max() < -150


def test_tta_refuses_training_steps(cnn):
  model, variables = cnn
  with pytest.raises(ValueError, match='for evaluation'):
    _run(tta.on_images(model, 'flip', 32, PP, 'softmax'), variables, _images(), train=True)


# --- predict -------------------------------------------------------------------------------------

def _pixel_export(tmp_path, *, temperature=None, spec=SOFT, size=(12, 8)):
  """A Predictor on the Pixel stub (logits = half the normalised top-left pixel) and an image."""
  meta = {'arch': 'pixel', 'num_classes': 3, 'preprocessing': spec.to_json(),
          'labels': ['a', 'b', 'c']}
  if temperature is not None:
    meta['temperature'] = temperature
  w, h = size
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  image = np.stack([10 * r + c, 100 + r, 200 + c], -1).astype(np.uint8)
  file = str(tmp_path / 'ramp.png')
  Image.fromarray(image).save(file)
  stub = Pixel()
  return stub, stub.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3))), meta, file


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _probabilities(result):
  return np.array([q['probability'] for q in sorted(result['predictions'],
                                                    key=lambda q: q['index'])])


def test_predict_views_are_the_eval_views_of_the_shorter_side_square(tmp_path):
  *_, file = _pixel_export(tmp_path)
  image = predict.decode_image(file)            # 12 wide, 8 high: the centre square is cols 2–9
  views = predict.views(image, RAW, 'ten_crop')[..., 0]
  ramp = np.asarray(image, np.float32)[..., 0]
  square = ramp[:, 2:10]
  crops = [square[:4, :4], square[:4, 4:], square[4:, :4], square[4:, 4:], square[2:6, 2:6]]
  for i, crop in enumerate(crops):
    assert np.array_equal(views[i], crop) and np.array_equal(views[5 + i], crop[:, ::-1]), i
  assert np.array_equal(predict.views(image, RAW, 'none')[0], predict.prepare(image, RAW))
  flip = predict.views(image, RAW, 'flip')
  assert np.array_equal(flip[1], flip[0][:, ::-1])


def test_predict_temperature_divides_the_logits(tmp_path):
  stub, variables, meta, file = _pixel_export(tmp_path, temperature=2)
  logits = 0.5 * predict.prepare(predict.decode_image(file), SOFT)[0, 0, :3]
  result, = predict.Predictor(stub, variables, meta).predict_files([file], k=3)
  np.testing.assert_allclose(_probabilities(result), _softmax(logits / 2), rtol=1e-6)
  assert not np.allclose(_softmax(logits / 2), _softmax(logits), rtol=1e-3)
  del meta['temperature']
  result, = predict.Predictor(stub, variables, meta).predict_files([file], k=3)
  np.testing.assert_allclose(_probabilities(result), _softmax(logits), rtol=1e-6)


def test_predict_tta_averages_probabilities_then_applies_the_temperature(tmp_path):
  stub, variables, meta, file = _pixel_export(tmp_path, temperature=2.0)
  prepared = predict.prepare(predict.decode_image(file), SOFT)
  # The stub reads the top-left pixel: of the mirror, that is the view's top-right pixel.
  per_view = 0.5 * np.stack([prepared[0, 0, :3], prepared[0, -1, :3]])
  mean_p = _softmax(per_view).mean(0)
  result, = predict.Predictor(stub, variables, meta, tta='flip').predict_files([file], k=3)
  np.testing.assert_allclose(_probabilities(result), _softmax(np.log(mean_p) / 2), rtol=1e-6)
  with pytest.raises(ValueError, match='unknown TTA mode'):
    predict.Predictor(stub, variables, meta, tta='rotate')


def _tiny_export(tmp_path, **extra):
  model = models.create('simple_cnn_tiny', 3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), dict(shapes))
  path = str(tmp_path / 'export')
  weights_io.save_weights(path, variables, {
      'arch': 'simple_cnn_tiny', 'source': 'test', 'num_classes': 3,
      'preprocessing': PP.to_json(), 'labels': ['a', 'b', 'c'], **extra})
  image = str(tmp_path / 'x.png')
  Image.fromarray(np.asarray(_images(n=1, size=50)[0])).save(image)
  return path, image


def test_predict_output_names_temperature_and_tta(tmp_path, capsys):
  weights, image = _tiny_export(tmp_path, temperature=2.0)
  assert predict.run(weights, [image], topk=3, as_json=True, tta='flip') == 0
  doc = json.loads(capsys.readouterr().out)
  assert doc['temperature'] == 2.0 and doc['tta'] == 'flip'
  assert predict.run(weights, [image], topk=3) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == '# probabilities at temperature 2 (from the metadata)' and lines[1] == image


@pytest.mark.parametrize('value', [0, -1.5, float('nan'), float('inf'), 'warm', True, None])
def test_bad_temperature_is_a_one_line_load_error(tmp_path, capsys, value):
  weights, image = _tiny_export(tmp_path, temperature=value)
  assert predict.run(weights, [image]) == 1
  err = capsys.readouterr().err.strip()
  assert err.splitlines() == [err] and err.startswith(f'error: cannot load weights {weights}')
  assert 'metadata "temperature" must be a finite number > 0' in err


def test_no_temperature_and_no_tta_print_as_before(tmp_path, capsys):
  weights, image = _tiny_export(tmp_path)
  assert predict.run(weights, [image], topk=2, as_json=True) == 0
  assert set(json.loads(capsys.readouterr().out)) == {'weights', 'arch', 'results'}


def test_cli_tta_flag(tmp_path):
  weights, image = _tiny_export(tmp_path)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'tljax.predict', f'--weights={weights}', f'--image={image}']
  proc = subprocess.run(cmd + ['--tta=ten_crop'], capture_output=True, text=True, env=env,
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[0] == '# probabilities at tta ten_crop (10 views averaged)'
  proc = subprocess.run(cmd + ['--tta=mirror'], capture_output=True, text=True, env=env,
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 2 and proc.stderr.startswith('error: ') and 'five_crop' in proc.stderr


# --- evaluate ------------------------------------------------------------------------------------

def test_evaluate_with_tta_on_a_trained_workdir(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  config_arg = 'model=cnn_scratch,tiny'
  proc = subprocess.run([sys.executable, '-m', 'tljax.main', f'--config=configs/monkeys.py:{config_arg}',
                         f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  spec = importlib.util.spec_from_file_location('monkeys', os.path.join(ROOT, 'configs/monkeys.py'))
  monkeys = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(monkeys)
  config = monkeys.get_config(config_arg)
  config.eval.tta = 'ten_crop'
  from tljax import evaluate
  result = evaluate.evaluate(config, workdir)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith('val (latest checkpoint, step ') and 'tta ten_crop (10 views)' in line
  saved = json.load(open(os.path.join(workdir, 'eval_val.json')))
  assert saved['tta'] == result['tta'] == 'ten_crop'
  assert saved['count'] == 24 and 0.0 <= saved['accuracy'] <= 1.0
  assert np.isfinite(saved['loss']) and 0.0 <= saved['ece'] <= 1.0
