"""`python -m tljax.export`: the exported artifact computes what `model.apply` computes.

The reference is tljax's own forward pass (`model.apply`, on the default ops
backend) and `tljax.predict`'s end-to-end pipeline; the export is read back
only through the standalone loader, which must work with tljax unimportable.
Weights are seeded random with randomized BatchNorm statistics so a dropped
or mis-ordered variable cannot hide.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tljax import export, models
from tljax.data.preprocess import Preprocessing
from tljax.porting import weights_io

ARCHS = ('resnet_tiny', 'mobilenet_tiny', 'efficientnet_lite_tiny', 'simple_cnn_tiny')
TOL = 1e-5
ERRORS = {}  # (arch, format, batch) -> max abs diff, printed at the end with -s


def _loader():
  path = os.path.join(os.path.dirname(export.__file__), export.LOADER_FILE)
  spec = importlib.util.spec_from_file_location('export_loader_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


loader = _loader()


def random_variables(model, size, seed):
  """Seeded random variables of `model`'s shapes, built with numpy (no init to compile).

  BatchNorm statistics and affines are random too, so every variable shows in
  the logits; kernels are scaled by fan-in to keep activations O(1).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if 'var' in name or 'scale' in name:
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if 'mean' in name or 'bias' in name:
      return rng.normal(0, 0.2, x.shape).astype(np.float32)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.normal(0, 1, x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def reference_logits(model, variables, x):
  """`model.apply` in inference mode (jitted: eager Flax is slow on CPU, not different)."""
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def write_weights(directory, arch, num_classes=5, temperature=None, seed=0):
  size = models.input_size(arch)
  model = models.create(arch, num_classes)
  variables = random_variables(model, size, seed)
  pp = Preprocessing(input_size=size, resize=size + 8, mean=(120.0, 115.0, 100.0),
                     std=(60.0, 58.0, 57.0))
  meta = {'arch': arch, 'source': 'tests', 'num_classes': num_classes,
          'preprocessing': pp.to_json(), 'labels': [f'label{i}' for i in range(num_classes)],
          **({'temperature': temperature} if temperature else {})}
  weights_io.save_weights(str(directory), variables, meta)
  return model, variables


@pytest.fixture(scope='module', params=ARCHS)
def exported(request, tmp_path_factory):
  base = tmp_path_factory.mktemp(request.param)
  model, variables = write_weights(base / 'weights', request.param)
  doc = export.export(str(base / 'weights'), str(base / 'out'))
  return request.param, model, variables, base / 'out', doc


def test_round_trip_matches_model_apply_at_two_batch_sizes(exported):
  arch, model, variables, out, doc = exported
  assert doc['formats']['jax']['platforms'] == ['cpu', 'cuda']
  assert doc['input']['shape'] == [None, models.input_size(arch), models.input_size(arch), 3]
  run = loader.load(str(out))
  size = models.input_size(arch)
  x = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
  want_all = reference_logits(model, variables, x)  # one compile; row-wise, so batch 1 is row 0
  for batch in (1, 3):
    want, got = want_all[:batch], run(x[:batch])
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    ERRORS[(arch, 'jax', batch)] = (err, float(np.abs(want).max()))
    assert err <= TOL, (arch, batch, err)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A workdir as training leaves it: the final model in W/export, a fitted temperature."""
  workdir = tmp_path_factory.mktemp('run')
  write_weights(workdir / 'export', 'resnet_tiny', num_classes=4, temperature=1.7, seed=3)
  image = np.random.default_rng(5).integers(0, 256, (45, 61, 4), dtype=np.uint8)
  image[..., 3] = np.where(np.arange(61) < 30, 255, 90)  # alpha: composited over white
  Image.fromarray(image, 'RGBA').save(workdir / 'photo.png')
  assert export.run(str(workdir), None, None) == 0
  return workdir


def test_loader_runs_without_tljax_and_agrees_with_predict(trained_workdir, tmp_path):
  from tljax import predict
  out, photo = trained_workdir / 'exported', str(trained_workdir / 'photo.png')
  copied = str(out / export.LOADER_FILE)
  script = ("import runpy, sys; sys.modules['tljax'] = None; "  # any `import tljax` now fails
            f"sys.argv = [{copied!r}, {str(out)!r}, {photo!r}, '--topk=3', '--json']; "
            f"runpy.run_path({copied!r}, run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  standalone = json.loads(done.stdout)['results'][0]['predictions']

  predictor = predict.Predictor(*predict.load_for_inference(str(trained_workdir / 'export')))
  reference = predictor.predict_files([photo], k=3)[0]['predictions']
  assert [p['index'] for p in standalone] == [p['index'] for p in reference]
  assert [p['label'] for p in standalone] == [p['label'] for p in reference]
  np.testing.assert_allclose([p['probability'] for p in standalone],
                             [p['probability'] for p in reference], atol=1e-5)

  run = loader.load(str(out))
  x = run.preprocess(photo)
  np.testing.assert_array_equal(x, predict.prepare(predict.decode_image(photo), predictor.spec))
  err = float(np.abs(run(x[None]) - predictor.logits(x[None])).max())
  ERRORS[('resnet_tiny', 'loader vs predict', 1)] = (err, float(np.abs(run(x[None])).max()))
  assert err <= 1e-4
  assert run.temperature == 1.7 == json.loads((out / export.SPEC_FILE).read_text())[
      'output']['temperature']


def test_fixed_batch_and_wrong_shapes_are_one_line_errors(trained_workdir, tmp_path):
  doc = export.export(str(trained_workdir / 'export'), str(tmp_path), batch=2)
  assert doc['input']['shape'] == [2, 32, 32, 3]
  run = loader.load(str(tmp_path))
  assert run(np.zeros((2, 32, 32, 3))).shape == (2, 4)
  assert 'precision HIGHEST' in run._exported.mlir_module()  # float32 on GPUs too, not TF32
  for shape in [(3, 32, 32, 3), (2, 64, 64, 3), (32, 32, 3), (2, 3, 32, 32)]:
    with pytest.raises(loader.ExportLoadError, match=r'input has shape .* takes float32 2x32x32x3'
                       ) as e:
      run(np.zeros(shape, np.float32))
    assert '\n' not in str(e.value)
  with pytest.raises(loader.ExportLoadError, match='dtype uint8, .* not raw pixels'):
    run(np.zeros((2, 32, 32, 3), np.uint8))


def test_bfloat16_export_matches_the_bfloat16_model(trained_workdir, tmp_path):
  doc = export.export(str(trained_workdir / 'export'), str(tmp_path), dtype='bfloat16')
  assert doc['compute_dtype'] == 'bfloat16' and doc['input']['dtype'] == 'float32'
  model = models.create('resnet_tiny', 4, dtype=jnp.bfloat16)
  variables, _ = weights_io.load_weights(str(trained_workdir / 'export'))
  x = np.random.default_rng(6).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want = reference_logits(model, variables, x).astype(np.float32)
  got = loader.load(str(tmp_path))(x)
  err = float(np.abs(got - want).max())
  ERRORS[('resnet_tiny', 'jax bfloat16', 3)] = (err, float(np.abs(want).max()))
  assert err <= 1e-2 * max(1.0, float(np.abs(want).max()))  # a few bf16 roundings apart


def test_missing_workdir_and_unfinished_run(tmp_path):
  with pytest.raises(export.ExportError, match='does not exist; pass the --workdir'):
    export.find_final_export(str(tmp_path / 'nope'))
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(export.ExportError, match='has no final export .* finish or resume'):
    export.find_final_export(str(tmp_path))
  assert export.run(str(tmp_path), None, None) == 1
  assert export.run(None, None, None) == 1
  with pytest.raises(export.ExportError, match='onnx is not supported'):
    export.parse_formats('jax,onnx')
  with pytest.raises(export.ExportError, match='--batch must be'):
    export.parse_batch('0')


def test_flags_parse_alongside_predicts_and_a_bad_flag_is_one_line(capsys):
  from tljax import predict  # noqa: F401 - defines its own --weights on absl's global flags
  export._parse(['export', '--weights=DIR', '--batch=4', '--precision=default'])
  assert (export.FLAGS.weights, export.FLAGS.batch, export.FLAGS.precision) == ('DIR', '4',
                                                                                'default')
  with pytest.raises(SystemExit) as e:
    export._parse(['export', '--workdir=W', '--formats=onnx'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: Unknown command line flag 'formats'") and err.count('\n') == 1


def test_corrupted_or_missing_model_file(trained_workdir, tmp_path):
  out = tmp_path / 'copy'
  export.export(str(trained_workdir / 'export'), str(out))
  blob = bytearray((out / export.MODEL_FILE).read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  (out / export.MODEL_FILE).write_bytes(bytes(blob))
  with pytest.raises(loader.ExportLoadError, match=r'corrupt or was changed after export '
                     r'\(sha256 .* re-export') as e:
    loader.load(str(out))
  assert '\n' not in str(e.value)
  (out / export.MODEL_FILE).unlink()
  with pytest.raises(loader.ExportLoadError, match='model.jax not found'):
    loader.load(str(out))
  with pytest.raises(loader.ExportLoadError, match='not a tljax export directory'):
    loader.load(str(tmp_path))


def test_tflite_round_trip(tmp_path):
  tf = pytest.importorskip('tensorflow', reason='TFLite export needs the tljax[tfds] extra')
  model, variables = write_weights(tmp_path / 'w', 'simple_cnn_tiny', seed=7)
  doc = export.export(str(tmp_path / 'w'), str(tmp_path / 'out'), formats=('jax', 'tflite'))
  interpreter = tf.lite.Interpreter(model_path=str(tmp_path / 'out' / doc['formats']['tflite'][
      'file']))
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want_all = reference_logits(model, variables, x)
  for batch in (1, 3):
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp['index'], x[:batch].shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp['index'], x[:batch])
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]['index'])
    want = want_all[:batch]
    err = float(np.abs(got - want).max())
    ERRORS[('simple_cnn_tiny', 'tflite', batch)] = (err, float(np.abs(want).max()))
    assert err <= TOL, (batch, err)


def test_zz_print_errors():
  for key, (err, top) in sorted(ERRORS.items()):
    print(f'{key}: max abs diff {err:.3g}, max|logits| {top:.3g}')
