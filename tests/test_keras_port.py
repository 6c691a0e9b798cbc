"""Keras ports (InceptionV3, MobileNet V1, Keras MobileNetV2): parity, layouts, strict errors.

Golden fixtures (`tests/fixtures/keras/*.json`) were produced by
`keras.applications` itself (`tools/fixtures_keras.py`). Here the same seeded
weights are rebuilt with numpy, written with h5py in both layouts Keras uses
(the legacy one with Keras-2 names renumbered as another session would
number them, so only the topology order can map them), ported by
`from_keras` and compared with Keras' outputs. The live tests redo it with
Keras in-process: random weights and BN statistics, files written by Keras'
own savers.
"""

from __future__ import annotations

import functools
import os

import h5py
import jax
import numpy as np
import pytest

from tests import keras_h5, reference_weights
from tljax import models
from tljax.models import mobilenet_keras
from tljax.porting import from_keras
from tljax.porting import keras as kp
from tljax.porting.merge import PortError, flatten

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'keras')
MOBILENET_CASES = ('mobilenet_v1_a1.0', 'mobilenet_v1_a0.5', 'mobilenet_v2_keras_a1.0',
                   'mobilenet_v2_keras_a0.35')
HEAD_LAYER = {'inception_v3': 'predictions', 'mobilenet_v1': 'conv_preds',
              'mobilenet_v2_keras': 'predictions'}


def tolerance(reference_max_abs: float) -> float:
  return 1e-4 * max(1.0, reference_max_abs)


@functools.lru_cache(maxsize=None)
def fixture(case: str):
  fx = reference_weights.load_fixture(os.path.join(FIXTURES, f'{case}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['weight_seed'])


def write(tmp_path, case: str, layout: str = 'legacy', **kw) -> str:
  fx, weights = fixture(case)
  if layout == 'legacy':
    path = str(tmp_path / f'{case}.h5')
    keras_h5.write_legacy(path, fx['layers'], fx['manifest'], weights, **kw)
  else:
    path = str(tmp_path / f'{case}.weights.h5')
    keras_h5.write_keras3(path, fx['layers'], fx['manifest'], weights, **kw)
  return path


def assert_same_variables(a: dict, b: dict):
  fa, fb = flatten(a), flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def check_logits(model, variables, fx, label: str):
  apply = jax.jit(model.apply)
  for c in fx['cases']:
    x = reference_weights.random_inputs(c['input_seed'], c['input_shape'])
    ref = np.asarray(c['logits'], np.float32)
    out = np.asarray(apply(variables, x))
    err = float(np.abs(out - ref).max())
    print(f'{label} {c["input_shape"][1]}x{c["input_shape"][2]}: max|Δlogits| {err:.3g} '
          f'(max|logits| {np.abs(ref).max():.3g})')
    assert err <= tolerance(np.abs(ref).max()), (label, c['input_shape'], err)


@pytest.mark.parametrize('case', MOBILENET_CASES)
def test_golden_parity_mobilenets(tmp_path, case):
  fx, _ = fixture(case)
  # Keras-2 style names (`:0`, `depthwise_kernel`) in the legacy file; the Keras 3 file as 3.15 writes it.
  legacy = from_keras(write(tmp_path, case, 'legacy', keras2_names=True), fx['arch'], **fx['arch_kw'])
  keras3 = from_keras(write(tmp_path, case, 'keras3'), fx['arch'], **fx['arch_kw'])
  assert_same_variables(legacy, keras3)
  check_logits(models.create(fx['arch'], 1000, **fx['arch_kw']), legacy, fx, case)


def test_golden_parity_inception_full_and_mixed7(tmp_path):
  fx, _ = fixture('inception_v3')
  # Auto-generated names renumbered (conv2d_137, ...) and a whole-model file (`model_weights`).
  legacy_path = write(tmp_path, 'inception_v3', 'legacy', offset=137, keras2_names=True,
                      whole_model=True)
  keras3_path = write(tmp_path, 'inception_v3', 'keras3', offset=5)
  full = from_keras(legacy_path, 'inception_v3')
  assert_same_variables(full, from_keras(keras3_path, 'inception_v3'))
  check_logits(models.create('inception_v3', 1000), full, fx, 'inception_v3')

  cut, report = kp.convert_file(keras3_path, 'inception_v3', num_classes=3, cut='mixed7')
  assert report.head_reason == "cut='mixed7'; num_classes=3 != 1000"
  assert sorted(report.reinitialised) == ['params/head/logits/bias', 'params/head/logits/kernel']
  assert len(report.ignored) == 49 and all('after the cut at mixed7' in r for r in report.ignored[:-1])
  assert cut['params']['head']['logits']['kernel'].shape == (768, 3)
  full_backbone = flatten(full['params']['backbone'])
  for k, v in flatten(cut['params']['backbone']).items():
    np.testing.assert_array_equal(v, full_backbone[k])
  model = models.create('inception_v3', 3, cut='mixed7')
  features = jax.jit(lambda v, x: model.apply(v, x, method=model.features))
  for c in fx['cases']:
    ref = c['features']
    x = reference_weights.random_inputs(c['input_seed'], c['input_shape'])
    out = np.asarray(features(cut, x))
    assert list(out.shape) == ref['shape']
    sl = tuple(slice(None, None, s) for s in ref['stride'])
    err = float(np.abs(out[sl] - np.asarray(ref['values'], np.float32)).max())
    print(f'inception_v3 mixed7 {c["input_shape"][1]}x{c["input_shape"][2]}: max|Δ| {err:.3g} '
          f'(max|features| {ref["max_abs"]:.3g})')
    assert err <= tolerance(ref['max_abs'])


def test_keras_order_for_inception_matches_the_fixture_layer_kinds():
  """Keras' interleaved branch order, read off the real model's manifest, equals `keras_layers`."""
  fx, _ = fixture('inception_v3')
  kinds = {'Conv2D': 'conv', 'BatchNormalization': 'bn_noscale', 'Dense': 'dense'}
  per_layer = {}
  for e in fx['manifest']:
    per_layer.setdefault(e['name'].rsplit('/', 1)[0], []).append(e['shape'])
  keras_seq = [(kinds[cls], per_layer[name][0]) for name, cls in fx['layers'] if name in per_layer]
  model_shapes = kp._model_shapes('inception_v3', 1000, ())[1]
  ours = [(e.kind, list(model_shapes[f'params/{e.path}/' + ('kernel' if 'bn' not in e.kind else 'bias')]))
          for e in kp.keras_layers('inception_v3')]
  assert ours == keras_seq


def test_param_counts_equal_keras():
  for case in ('inception_v3',) + MOBILENET_CASES:
    fx, _ = fixture(case)
    keras_total = sum(int(np.prod(e['shape'])) for e in fx['manifest'])
    shapes = kp._model_shapes(fx['arch'], 1000, tuple(fx['arch_kw'].items()))[1]
    assert sum(int(np.prod(s)) for s in shapes.values()) == keras_total, case


def test_notop_file_reinitialises_the_head_and_keeps_the_trunk(tmp_path):
  case = 'mobilenet_v2_keras_a0.35'
  fx, _ = fixture(case)
  full = from_keras(write(tmp_path, case), 'mobilenet_v2_keras', alpha=0.35)
  for layout in ('legacy', 'keras3'):
    path = write(tmp_path, case, layout, drop=['predictions'])
    notop, report = kp.convert_file(path, 'mobilenet_v2_keras', alpha=0.35)
    assert report.head_reason == 'the file has no top (notop)' and not report.ignored
    assert sorted(report.reinitialised) == ['params/head/logits/bias', 'params/head/logits/kernel']
    assert notop['params']['head']['logits']['kernel'].shape == (1280, 1000)
    assert_same_variables({k: v['backbone'] for k, v in notop.items()},
                          {k: v['backbone'] for k, v in full.items()})


def test_new_num_classes_reinitialises_only_the_head(tmp_path):
  path = write(tmp_path, 'mobilenet_v1_a0.5')
  full = from_keras(path, 'mobilenet_v1', alpha=0.5)
  ten, report = kp.convert_file(path, 'mobilenet_v1', num_classes=10, alpha=0.5)
  assert report.ignored == ['conv_preds (num_classes=10 != 1000)']
  assert ten['params']['head']['logits']['kernel'].shape == (512, 10)
  assert_same_variables(ten['batch_stats'], full['batch_stats'])
  assert_same_variables(ten['params']['backbone'], full['params']['backbone'])


def test_wrong_alpha_names_the_right_one(tmp_path):
  path = write(tmp_path, 'mobilenet_v1_a0.5', 'legacy', drop=['conv_preds'])
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v1', alpha=1.0)
  msg = str(e.value)
  assert "from_keras(path, 'mobilenet_v1', alpha=0.5)" in msg
  assert 'conv1 → params/backbone/conv1/kernel: file (3, 3, 3, 16) vs model (3, 3, 3, 32)' in msg


def test_wrong_architecture_names_the_right_one(tmp_path):
  path = write(tmp_path, 'inception_v3', 'keras3', offset=3)
  with pytest.raises(PortError) as e:
    from_keras(path, 'mobilenet_v2_keras')
  msg = str(e.value)
  assert "from_keras(path, 'inception_v3')" in msg and 'does not fit mobilenet_v2_keras' in msg


def test_missing_layer_is_listed(tmp_path):
  path = write(tmp_path, 'mobilenet_v2_keras_a0.35', 'keras3', drop=['block_16_project'])
  with pytest.raises(PortError, match=r'(?s)missing from the file.*backbone/Conv_1'):
    from_keras(path, 'mobilenet_v2_keras', alpha=0.35)


def test_renamed_layer_is_rejected_unless_names_are_not_strict(tmp_path):
  case = 'mobilenet_v1_a0.5'
  path = write(tmp_path, case)
  original = from_keras(path, 'mobilenet_v1', alpha=0.5)
  with h5py.File(path, 'r+') as f:
    names = [n.decode() for n in f.attrs['layer_names']]
    names = ['conv_pw_9_renamed' if n == 'conv_pw_9' else n for n in names]
    f.move('conv_pw_9', 'conv_pw_9_renamed')
    f.attrs['layer_names'] = np.array([n.encode() for n in names])
  with pytest.raises(PortError, match="'conv_pw_9_renamed' sits where Keras puts 'conv_pw_9'"):
    from_keras(path, 'mobilenet_v1', alpha=0.5)
  assert_same_variables(from_keras(path, 'mobilenet_v1', alpha=0.5, strict_names=False), original)


def test_chunked_layer_names_attribute(tmp_path):
  """Keras splits attributes over 64 KB into `layer_names0`, `layer_names1`, ..."""
  path = write(tmp_path, 'mobilenet_v1_a0.5')
  original = from_keras(path, 'mobilenet_v1', alpha=0.5)
  with h5py.File(path, 'r+') as f:
    names = f.attrs['layer_names']
    del f.attrs['layer_names']
    f.attrs['layer_names0'], f.attrs['layer_names1'] = names[:40], names[40:]
  assert_same_variables(from_keras(path, 'mobilenet_v1', alpha=0.5), original)


def test_not_a_keras_file(tmp_path):
  path = tmp_path / 'x.h5'
  with h5py.File(path, 'w') as f:
    f.create_dataset('w', data=np.zeros(3))
  with pytest.raises(PortError, match='not a Keras weights file'):
    from_keras(str(path), 'mobilenet_v1')
  with pytest.raises(ValueError, match='no Keras port for'):
    from_keras(str(path), 'resnet50')


def test_catalog_entries():
  cat = kp.CATALOG
  spec = cat['inception_v3']
  assert spec.url == ('https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/'
                      'inception_v3_weights_tf_dim_ordering_tf_kernels.h5')
  assert spec.sha256 is None and len(kp.MD5['inception_v3']) == 32
  assert spec.preprocessing.input_size == 299 and spec.preprocessing.mean == (127.5,) * 3
  assert cat['inception_v3:notop'].filename.endswith('_notop.h5')
  v1 = cat['mobilenet_v1:alpha0.5']
  assert v1.url.endswith('/mobilenet/mobilenet_5_0_224_tf.h5') and v1.arch_kw == {'alpha': 0.5}
  assert v1.preprocessing.input_size == 224
  v2 = cat['mobilenet_v2_keras:alpha0.35_notop']
  assert v2.url.endswith('/mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5')
  assert cat['mobilenet_v2_keras:alpha1.4_160'].preprocessing.input_size == 160
  assert all(s.source == 'keras' and s.key == k for k, s in cat.items())


@pytest.mark.parametrize('alpha,stem,last', [(0.25, 8, 256), (0.75, 24, 768), (1.0, 32, 1024)])
def test_mobilenet_v1_alpha_widths(alpha, stem, last):
  shapes = kp._model_shapes('mobilenet_v1', 1000, (('alpha', alpha),))[1]
  assert shapes['params/backbone/conv1/kernel'] == (3, 3, 3, stem)
  assert shapes['params/head/logits/kernel'] == (last, 1000)


@pytest.mark.parametrize('alpha,stem,last', [(0.35, 16, 1280), (0.5, 16, 1280), (1.3, 40, 1664),
                                             (1.4, 48, 1792)])
def test_mobilenet_v2_keras_alpha_widths(alpha, stem, last):
  shapes = kp._model_shapes('mobilenet_v2_keras', 1000, (('alpha', alpha),))[1]
  assert shapes['params/backbone/Conv1/kernel'] == (3, 3, 3, stem)
  assert shapes['params/backbone/Conv_1/kernel'][-1] == last


def test_keras_same_and_correct_pad():
  # TF 'same' at stride 2 pads after only on even sizes; `correct_pad` pads before only on odd ones.
  assert mobilenet_keras.tf_same_padding(224, 3, 2) == (0, 1)
  assert mobilenet_keras.tf_same_padding(193, 3, 2) == (1, 1)
  assert mobilenet_keras.correct_pad(112) == (0, 1)
  assert mobilenet_keras.correct_pad(97) == (1, 1)


# ---------------------------------------------------------------- live: Keras in-process

def _live_model(keras_model: str, size, seed: int = 3, **kw):
  """A real Keras application with seeded random weights (BN statistics included)."""
  import keras
  from tools import fixtures_keras
  keras.backend.clear_session()
  model = getattr(keras.applications, keras_model)(weights=None, input_shape=(*size, 3), **kw)
  manifest = fixtures_keras.manifest_of(model)
  fixtures_keras.set_weights(model, manifest, reference_weights.build(manifest, seed))
  return model


def _save_layouts(model, tmp_path, whole_model: bool) -> dict[str, str]:
  """The files Keras itself writes: `.weights.h5`, the legacy weights layout, a legacy whole model."""
  from keras.src.legacy.saving import legacy_h5_format
  paths = {'keras3': str(tmp_path / 'm.weights.h5'), 'legacy': str(tmp_path / 'm_legacy.h5')}
  model.save_weights(paths['keras3'])
  with h5py.File(paths['legacy'], 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  if whole_model:
    paths['whole_model'] = str(tmp_path / 'm_model.h5')
    model.save(paths['whole_model'])
  return paths


# Building a Keras model takes ~10-30 s on a shared 2-core machine, so `make test` runs one
# live case (the V2 with odd sizes: TF 'same' + correct_pad); `make parity` runs them all.
LIVE = [
    pytest.param('MobileNetV2', 'mobilenet_v2_keras', {'alpha': 0.35}, (67, 90), False,
                 id='mobilenet_v2_keras'),
    pytest.param('MobileNet', 'mobilenet_v1', {'alpha': 0.25}, (67, 90), True, id='mobilenet_v1',
                 marks=pytest.mark.reference),
    pytest.param('InceptionV3', 'inception_v3', {}, (83, 107), True, id='inception_v3',
                 marks=pytest.mark.reference),
]


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # Keras' own np.array(copy=False) calls
@pytest.mark.parametrize('keras_model,arch,kw,size,whole_model', LIVE)
def test_live_keras_files_port_exactly(tmp_path, keras_model, arch, kw, size, whole_model):
  model = _live_model(keras_model, size, classifier_activation=None, **kw)
  x = reference_weights.random_inputs(7, (2, *size, 3))
  ref = model.predict(x, batch_size=2, verbose=0)
  ported = {k: from_keras(p, arch, **kw) for k, p in _save_layouts(model, tmp_path, whole_model).items()}
  for layout in ported:
    assert_same_variables(ported['keras3'], ported[layout])
  out = np.asarray(jax.jit(models.create(arch, 1000, **kw).apply)(ported['keras3'], x))
  err = float(np.abs(out - ref).max())
  print(f'live {arch} {kw} {size}: max|Δlogits| {err:.3g} (max|logits| {np.abs(ref).max():.3g})')
  assert err <= tolerance(np.abs(ref).max())


@pytest.mark.reference
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_live_keras_notop_backbone(tmp_path):
  size = (64, 75)
  model = _live_model('MobileNetV2', size, include_top=False, alpha=0.35)
  x = reference_weights.random_inputs(8, (2, *size, 3))
  ref = model.predict(x, batch_size=2, verbose=0)
  path = str(tmp_path / 'notop.weights.h5')
  model.save_weights(path)
  variables, report = kp.convert_file(path, 'mobilenet_v2_keras', num_classes=4, alpha=0.35)
  assert 'notop' in report.head_reason and len(report.reinitialised) == 2
  net = models.create('mobilenet_v2_keras', 4, alpha=0.35)
  out = np.asarray(jax.jit(lambda v, x: net.apply(v, x, method=net.features))(variables, x))
  assert out.shape == ref.shape
  err = float(np.abs(out - ref).max())
  print(f'live mobilenet_v2_keras notop features {size}: max|Δ| {err:.3g}')
  assert err <= tolerance(np.abs(ref).max())
