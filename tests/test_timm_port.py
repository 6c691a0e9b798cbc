"""timm / hub safetensors → tljax: golden parity, config.json preprocessing, strict errors.

Golden fixtures (tests/fixtures/timm/resnet*.json, from
tools/fixtures_timm_resnet.py) hold a manifest + seed and the logits real
timm computed; numpy rebuilds the weights, they are written the way the hub
stores them (`model.safetensors` + `config.json`) and ported with
`from_timm`. Most other checks use `resnet_tiny`'s state dict in timm's
(= torchvision's) layout. The `reference` test saves a real timm model
with timm's own hub writer and compares live.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import reference_weights
from tljax import models, port, predict
from tljax.data.preprocess import Preprocessing
from tljax.porting import catalog, weights_io
from tljax.porting import timm as timm_port
from tljax.porting import torchvision as tv
from tljax.porting.merge import PortError, check_and_merge, flatten

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def fixture(family, arch):
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', family, f'{arch}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['seed'])


def hub_config(arch, num_classes=1000, **cfg):
  """A config.json as timm's hub writer lays it out (architecture + pretrained_cfg)."""
  pretrained = {'tag': 'a1_in1k', 'custom_load': False, 'input_size': [3, 224, 224],
                'fixed_input_size': False, 'interpolation': 'bicubic', 'crop_pct': 0.95,
                'crop_mode': 'center', 'mean': IMAGENET_MEAN, 'std': IMAGENET_STD,
                'num_classes': num_classes, 'first_conv': 'conv1', 'classifier': 'fc', **cfg}
  return {'architecture': arch, 'num_classes': num_classes, 'global_pool': 'avg',
          'pretrained_cfg': pretrained}


def write_snapshot(directory, state_dict, arch=None, num_classes=1000, **cfg):
  """`directory`/model.safetensors (+ config.json unless `arch` is None), like a hub snapshot."""
  os.makedirs(directory, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
            os.path.join(directory, 'model.safetensors'))
  if arch is not None:
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(hub_config(arch, num_classes, **cfg), f)
  return str(directory)


@pytest.fixture
def tiny(monkeypatch):
  """resnet_tiny's state dict; the converter is registered for timm for the test only."""
  monkeypatch.setitem(timm_port.CONVERTERS, 'resnet_tiny', tv.convert_resnet)
  return fixture('torchvision', 'resnet_tiny')[1]


@pytest.mark.parametrize('arch', ('resnet18', 'resnet34', 'resnet50'))
def test_golden_parity_at_224_and_non_square(arch, tmp_path):
  fx, state_dict = fixture('timm', arch)
  variables = timm_port.from_timm(write_snapshot(tmp_path / 'snap', state_dict, arch), arch)
  apply = jax.jit(models.create(arch, 1000).apply)
  for case, ref in zip(fx['inputs'], fx['logits']):
    x = reference_weights.random_inputs(case['seed'], case['shape'])
    y, ref = np.asarray(apply(variables, x)), np.asarray(ref, np.float32)
    err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
    print(f'golden timm {arch} {x.shape[1]}x{x.shape[2]}: max|dlogits| = {err:.3g} '
          f'(max|logits| = {scale:.4g})')
    assert y.shape == ref.shape and err <= 1e-4 * max(1.0, scale)


def test_equals_torchvision_port_and_config_preprocessing_lands_in_metadata(tmp_path):
  fx, state_dict = fixture('timm', 'resnet18')
  snap = write_snapshot(tmp_path / 'snap', state_dict, 'resnet18')
  from_file, replaced = timm_port.port(snap, 'resnet18')
  assert replaced == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_file,
                         tv.from_torchvision(state_dict, 'resnet18'))
  meta = port.run_timm_port('resnet18', str(tmp_path / 'w'), input_path=snap)
  pp = Preprocessing.from_json(meta['preprocessing'])
  assert pp == Preprocessing(input_size=224, resize=235, interpolation='bicubic',
                             mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
  assert meta['preprocessing_source'] == 'config.json pretrained_cfg'
  assert (meta['arch'], meta['source'], meta['tag'], meta['hub_id']) == (
      'resnet18', 'timm', 'a1_in1k', 'timm/resnet18.a1_in1k')
  assert meta['labels'] == 'imagenet1k' and meta['num_classes'] == 1000
  assert meta['sha256'] == port.sha256_of(os.path.join(snap, 'model.safetensors'))
  assert meta['url'] == 'https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors'

  # predict reads the ported directory: timm's preprocessing, ImageNet names, timm's logits.
  predictor = predict.Predictor(*predict.load_for_inference(str(tmp_path / 'w')))
  assert predictor.spec == pp and predictor.names[0] == 'tench'
  case, ref = fx['inputs'][0], np.asarray(fx['logits'][0], np.float32)
  y = predictor.logits(reference_weights.random_inputs(case['seed'], case['shape']))
  assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_directory_file_and_tagged_name_give_the_same_weights(tiny, tmp_path):
  snap = write_snapshot(tmp_path / 'snap', tiny, 'resnet_tiny', num_classes=10)
  a = timm_port.from_timm(snap, 'resnet_tiny', num_classes=10)
  b = timm_port.from_timm(os.path.join(snap, 'model.safetensors'), 'resnet_tiny.a1_in1k',
                          num_classes=10)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a,
                         tv.from_torchvision(tiny, 'resnet_tiny', num_classes=10))
  assert timm_port.split_name('resnet50.a1_in1k') == ('resnet50', 'a1_in1k')
  assert timm_port.split_name('vit_base_patch16_224.augreg2_in21k_ft_in1k') == (
      'vit_base_patch16_224', 'augreg2_in21k_ft_in1k')
  assert timm_port.split_name('resnet18') == ('resnet18', '')
  info = timm_port.describe(snap, 'resnet_tiny.ra_in1k')   # the name's tag wins over config's
  assert (info['tag'], info['hub_id']) == ('ra_in1k', 'timm/resnet_tiny.ra_in1k')
  assert timm_port.describe(snap, 'resnet_tiny')['tag'] == 'a1_in1k'


def test_pickle_in_a_snapshot_directory_is_read_without_torch(tiny, tmp_path):
  snap = tmp_path / 'snap'
  snap.mkdir()
  with open(os.path.join(HERE, 'fixtures', 'torch_pickles', 'resnet_tiny_zip.pth'), 'rb') as f:
    (snap / 'pytorch_model.bin').write_bytes(f.read())
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         timm_port.from_timm(str(snap), 'resnet_tiny', num_classes=10),
                         tv.from_torchvision(tiny, 'resnet_tiny', num_classes=10))


def test_missing_extra_and_misshaped_tensors_are_each_named(tiny, tmp_path):
  sd = dict(tiny)
  del sd['layer1.0.bn2.running_var']
  sd['layer9.0.conv1.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  sd['layer2.0.conv2.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(PortError) as e:
    timm_port.from_timm(write_snapshot(tmp_path / 's', sd), 'resnet_tiny', num_classes=10)
  msg = str(e.value)
  for name in ('layer1.0.bn2.running_var', 'layer9.0.conv1.weight',
               'params/backbone/layer2_0/conv2/kernel: checkpoint (1, 1, 16, 16)'):
    assert name in msg
  assert 'missing (1)' in msg and 'unexpected (1)' in msg and 'shape mismatch (1)' in msg


def test_architecture_in_config_must_match_arch(tiny, tmp_path):
  snap = write_snapshot(tmp_path / 's', tiny, 'resnet50', num_classes=10)
  with pytest.raises(PortError, match=r"architecture 'resnet50' but --arch is 'resnet_tiny'"):
    timm_port.from_timm(snap, 'resnet_tiny', num_classes=10)
  with pytest.raises(ValueError, match='no timm converter for'):
    timm_port.from_timm(snap, 'resnet_huge')


def test_config_of_a_non_default_network_is_refused(tiny, tmp_path):
  snap = write_snapshot(tmp_path / 's', tiny, 'resnet_tiny', num_classes=10)
  config = json.load(open(os.path.join(snap, 'config.json')))
  config['global_pool'] = 'max'
  config['model_args'] = {'in_chans': 1, 'global_pool': 'max'}
  json.dump(config, open(os.path.join(snap, 'config.json'), 'w'))
  with pytest.raises(PortError, match=r"non-default resnet_tiny: global_pool 'max' \(tljax ports "
                     r"resnet_tiny with 'avg'\); in_chans 1"):
    timm_port.from_timm(snap, 'resnet_tiny', num_classes=10)
  config = hub_config('vit_small_patch16_224')
  config['model_args'] = {'global_pool': 'token', 'img_size': [384, 384]}
  json.dump(config, open(os.path.join(snap, 'config.json'), 'w'))
  with pytest.raises(PortError, match=r'img_size \[384, 384\]'):
    timm_port.describe(snap, 'vit_small_patch16_224')


def test_files_that_are_not_safetensors_truncated_or_oversized(tiny, tmp_path):
  path = tmp_path / 'model.safetensors'
  with open(os.path.join(HERE, 'fixtures', 'torch_pickles', 'resnet_tiny_zip.pth'), 'rb') as f:
    path.write_bytes(f.read())
  with pytest.raises(PortError, match=r'is not a safetensors file \(its first 8 bytes claim'):
    timm_port.from_timm(str(path), 'resnet_tiny')
  path.write_bytes(b'\x05\x00\x00\x00\x00\x00\x00\x00{"a":')
  with pytest.raises(PortError, match='its header is not safetensors JSON'):
    timm_port.from_timm(str(path), 'resnet_tiny')
  path.write_bytes(b'abc')
  with pytest.raises(PortError, match='shorter than the 8-byte header length'):
    timm_port.from_timm(str(path), 'resnet_tiny')

  whole = os.path.join(write_snapshot(tmp_path / 's', tiny), 'model.safetensors')
  data = open(whole, 'rb').read()
  path.write_bytes(data[:len(data) - 1000])
  with pytest.raises(PortError, match=r'is truncated: its header claims \d+ bytes, the file holds'):
    timm_port.from_timm(str(path), 'resnet_tiny')

  header = json.dumps({'w': {'dtype': 'F32', 'shape': [1 << 31], 'data_offsets': [0, 1 << 33]}})
  path.write_bytes(len(header).to_bytes(8, 'little') + header.encode() + b'\0' * 64)
  with pytest.raises(PortError, match='claims 8.0 GiB of tensors, more than the 4 GiB'):
    timm_port.from_timm(str(path), 'resnet_tiny')


def test_non_float_and_nonfinite_weights_are_refused(tiny, tmp_path):
  sd = {**tiny, 'bn1.weight': tiny['bn1.weight'].astype(np.int32),
        'bn1.num_batches_tracked': np.zeros((), np.int64)}
  with pytest.raises(PortError, match=r'weights must be float16/32/64, found bn1.weight \(I32\)'):
    timm_port.from_timm(write_snapshot(tmp_path / 'int', sd), 'resnet_tiny', num_classes=10)

  bad = dict(tiny)
  bad['layer1.0.conv2.weight'] = bad['layer1.0.conv2.weight'].copy()
  bad['layer1.0.conv2.weight'][0, 0, 0, 0] = np.nan
  snap = write_snapshot(tmp_path / 'nan', bad)
  with pytest.raises(PortError, match=r'layer1_0/conv2/kernel holds 1 non-finite'):
    timm_port.from_timm(snap, 'resnet_tiny', num_classes=10)
  kept = timm_port.from_timm(snap, 'resnet_tiny', num_classes=10, allow_nonfinite=True)
  assert np.isnan(kept['params']['backbone']['layer1_0']['conv2']['kernel']).sum() == 1


def test_training_loads_the_ported_weights_and_their_preprocessing(tiny, tmp_path):
  from tljax import components
  from tljax import config as config_lib
  snap = write_snapshot(tmp_path / 's', tiny, 'resnet_tiny', num_classes=10,
                        input_size=[3, 32, 32], crop_pct=0.8, interpolation='bilinear')
  port.run_timm_port('resnet_tiny', str(tmp_path / 'w'), input_path=snap)
  cfg = config_lib.base_config()
  cfg.model.name = 'resnet_tiny'
  cfg.pretrained.source, cfg.pretrained.path = 'dir', str(tmp_path / 'w')
  pretrained, meta = components.pretrained_weights(cfg)
  pp = components.preprocessing(cfg, meta)
  assert (pp.input_size, pp.resize, pp.interpolation) == (32, 40, 'bilinear')
  model = components.create_model(cfg, 3)
  # What `components.init_variables` merges into (zeros instead of a compiled random init).
  variables, not_loaded = check_and_merge(components.zero_variables(cfg, model, 32), pretrained,
                                          dont_load=cfg.pretrained.dont_load)
  assert not_loaded == ['params/head/logits/bias', 'params/head/logits/kernel']
  for k, v in flatten(tv.from_torchvision(tiny, 'resnet_tiny', num_classes=10)).items():
    if '/head/' not in k:
      np.testing.assert_array_equal(flatten(variables)[k], v)


def test_pretrained_cfg_to_preprocessing():
  cfg = lambda **kw: {'input_size': [3, 224, 224], 'interpolation': 'bicubic',
                      'mean': [0.5] * 3, 'std': [0.5] * 3, **kw}
  pp = timm_port.preprocessing_from_cfg(cfg(crop_pct=0.9, crop_mode='center'), 'x')
  assert (pp.input_size, pp.resize, pp.resize_mode, pp.interpolation) == (224, 248, 'shorter',
                                                                         'bicubic')
  assert pp.mean == (127.5,) * 3 and pp.std == (127.5,) * 3
  assert timm_port.preprocessing_from_cfg(cfg(), 'x').resize == 256   # timm's crop_pct 0.875
  pp = timm_port.preprocessing_from_cfg(cfg(crop_pct=1.0, crop_mode='squash'), 'x')
  assert (pp.resize, pp.resize_mode) == (224, 'exact')
  for bad, match in ((cfg(crop_mode='border'), "crop_mode 'border'"),
                     (cfg(crop_mode='squash', crop_pct=0.9), "crop_mode 'squash' with crop_pct"),
                     (cfg(interpolation='lanczos'), "interpolation 'lanczos'"),
                     (cfg(input_size=[3, 224, 256]), 'is not a square'),
                     (cfg(std=[0.5, 0.5]), 'must be 3 values')):
    with pytest.raises(PortError, match=match):
      timm_port.preprocessing_from_cfg(bad, 'x')


def test_without_config_json_the_catalog_default_is_recorded(tmp_path):
  _, state_dict = fixture('timm', 'resnet18')
  meta = port.run_timm_port('resnet18', str(tmp_path / 'w'),
                            input_path=write_snapshot(tmp_path / 's', state_dict))
  assert meta['preprocessing'] == catalog.lookup('timm', 'resnet18').preprocessing.to_json()
  assert meta['preprocessing_source'] == ('timm default cfg of resnet18.a1_in1k '
                                          '(no config.json beside the file)')
  assert meta['tag'] == 'a1_in1k' and meta['checksum_check'] == 'none published'


def test_catalog_holds_every_arch_with_timm_default_tags():
  archs = ('resnet18', 'resnet34', 'resnet50', 'mobilenetv3_large_100', 'efficientnet_b0',
           'convnext_tiny', 'vit_small_patch16_224', 'vit_base_patch16_224')
  assert 'timm' in catalog.SOURCES
  for arch in archs:
    spec = catalog.lookup('timm', arch)
    tag = timm_port.DEFAULT_TAGS[arch]
    assert spec == catalog.lookup('timm', arch, tag).__class__(**{
        **spec.__dict__, 'variant': ''})
    assert spec.url == f'https://huggingface.co/timm/{arch}.{tag}/resolve/main/model.safetensors'
    assert spec.filename == 'model.safetensors' and spec.sha256 is None
  vit = catalog.lookup('timm', 'vit_base_patch16_224').preprocessing
  assert (vit.resize, vit.mean, vit.interpolation) == (248, (127.5,) * 3, 'bicubic')
  assert 'timm/resnet50.a1_in1k' in port.catalog_table()


def test_download_without_huggingface_hub_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  with pytest.raises(PortError) as e:
    port.run_timm_port('resnet18', str(tmp_path / 'w'), download=True,
                       download_dir=str(tmp_path / 'dl'))
  msg = str(e.value)
  assert "pip install 'tljax[hub]'" in msg and '\n' not in msg
  assert 'https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/config.json' in msg


def test_download_offline_names_both_urls_and_the_input_command(monkeypatch, tmp_path):
  calls = []

  def unreachable(repo_id, filename, **kw):
    calls.append((repo_id, filename, kw.get('local_dir')))
    raise ConnectionError('[Errno 101] Network is unreachable\nmore detail')

  fake = type(sys)('huggingface_hub')
  fake.hf_hub_download = unreachable
  monkeypatch.setitem(sys.modules, 'huggingface_hub', fake)
  with pytest.raises(PortError) as e:
    port.run_timm_port('resnet50.a1_in1k', str(tmp_path / 'w'), download=True, num_classes=5,
                       download_dir=str(tmp_path / 'dl'))
  msg = str(e.value)
  assert '\n' not in msg and 'Network is unreachable' in msg and 'offline' in msg
  for f in ('model.safetensors', 'config.json'):
    assert f'https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/{f}' in msg
  assert ('python -m tljax.port --source=timm --arch=resnet50.a1_in1k --input=' in msg
          and '--num_classes=5' in msg)
  assert calls == [('timm/resnet50.a1_in1k', 'model.safetensors',
                    str(tmp_path / 'dl' / 'timm--resnet50.a1_in1k'))]
  assert not (tmp_path / 'w').exists()


def test_download_of_a_repo_the_hub_lacks_names_it(monkeypatch, tmp_path):
  class RepositoryNotFoundError(OSError):   # the hub client's name for a 404 repo
    pass

  def missing(repo_id, filename, **kw):
    raise RepositoryNotFoundError('404 Client Error')

  fake = type(sys)('huggingface_hub')
  fake.hf_hub_download = missing
  monkeypatch.setitem(sys.modules, 'huggingface_hub', fake)
  with pytest.raises(PortError, match=r'the hub has no timm/resnet18.nope/model.safetensors .*'
                     r'check the arch and tag'):
    port.run_timm_port('resnet18.nope', str(tmp_path / 'w'), download=True,
                       download_dir=str(tmp_path / 'dl'))


def test_download_ports_what_the_hub_client_fetched(tiny, monkeypatch, tmp_path):
  def from_hub(repo_id, filename, local_dir):
    assert repo_id == 'timm/resnet_tiny.a1_in1k'
    write_snapshot(local_dir, tiny, 'resnet_tiny', num_classes=10,
                   label_names=[f'n{i}' for i in range(10)])
    return os.path.join(local_dir, filename)

  fake = type(sys)('huggingface_hub')
  fake.hf_hub_download = from_hub
  monkeypatch.setitem(sys.modules, 'huggingface_hub', fake)
  meta = port.run_timm_port('resnet_tiny.a1_in1k', str(tmp_path / 'w'), download=True,
                            download_dir=str(tmp_path / 'dl'))
  assert meta['hub_id'] == 'timm/resnet_tiny.a1_in1k' and meta['num_classes'] == 10
  assert meta['labels'] == [f'n{i}' for i in range(10)]
  fake.hf_hub_download = None   # a finished download is reused, not fetched again
  port.run_timm_port('resnet_tiny.a1_in1k', str(tmp_path / 'w2'), download=True,
                     download_dir=str(tmp_path / 'dl'))


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'tljax.port', '--source=timm', *args],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})


def test_cli_ports_with_a_new_head_and_predict_runs(tmp_path, capsys):
  _, state_dict = fixture('timm', 'resnet18')
  snap = write_snapshot(tmp_path / 'snap', state_dict, 'resnet18')
  out = tmp_path / 'w5'
  proc = _cli('--arch=resnet18', f'--input={snap}', f'--output={out}', '--num_classes=5')
  assert proc.returncode == 0, proc.stderr
  assert 'preprocessing from config.json pretrained_cfg' in proc.stdout
  variables, meta = weights_io.load_weights(str(out))
  assert meta['num_classes'] == 5 and meta['head_reinitialized'] and meta['labels'] is None
  assert meta['preprocessing']['resize'] == 235
  full = flatten(tv.from_torchvision(state_dict, 'resnet18'))
  new = flatten(variables)
  assert sorted(k for k in full if '/head/logits/' in k) == sorted(
      k for k in new if '/head/logits/' in k)
  for k, v in full.items():
    if '/head/logits/' in k:
      assert new[k].shape == v.shape[:-1] + (5,)
    else:
      np.testing.assert_array_equal(new[k], v)

  from PIL import Image
  image = tmp_path / 'im.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
  assert predict.run(str(out), [str(image)], as_json=True) == 0
  result = json.loads(capsys.readouterr().out)['results'][0]
  assert len(result['predictions']) == 5 and result['predictions'][0]['label'].startswith('class_')


def test_the_hub_clients_retry_warnings_do_not_reach_the_user(monkeypatch, tmp_path, capfd,
                                                              caplog):
  import logging

  def retrying(repo_id, filename, **kw):
    # As the real client does: its lazily imported modules (re)configure its root logger's level
    # on first use, after the caller could set it, then log each retry.
    logging.getLogger('huggingface_hub').setLevel(logging.WARNING)
    logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 8s [Retry 5/5].')
    raise ConnectionError("[Errno -2] Name or service not known")

  fake = type(sys)('huggingface_hub')
  fake.hf_hub_download = retrying
  monkeypatch.setitem(sys.modules, 'huggingface_hub', fake)
  with pytest.raises(PortError, match='offline'):
    port.run_timm_port('resnet18', str(tmp_path / 'w'), download=True,
                       download_dir=str(tmp_path / 'dl'))
  assert 'Retrying' not in caplog.text and 'Retrying' not in capfd.readouterr().err
  logging.getLogger('tljax.test').warning('after the download')
  assert 'after the download' in caplog.text, 'logging must be restored after the download'


def test_cli_download_offline_or_without_the_hub_client_is_one_line(tmp_path):
  proc = _cli('--arch=resnet18', '--download', f'--download_dir={tmp_path}',
              f'--output={tmp_path / "w"}', env={'HF_HUB_OFFLINE': '1'})
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ')
  try:
    import huggingface_hub  # noqa: F401
    assert 'resolve/main/model.safetensors' in lines[0] and '--input=' in lines[0]
  except ImportError:
    assert "pip install 'tljax[hub]'" in lines[0]


@pytest.mark.reference
@pytest.mark.parametrize('arch', ('resnet18',))
def test_live_parity_with_timm_hub_files(arch, tmp_path):
  """A real timm model, saved by timm's own hub writer, ported and compared live."""
  import timm
  import torch
  from timm.models._hub import save_for_hf
  sys.path.insert(0, os.path.dirname(HERE))
  from tools.fixtures_timm_resnet import logits_of, seeded_model
  model, _, _ = seeded_model(arch, seed=7)
  save_for_hf(model, str(tmp_path / 'snap'), safe_serialization=True)
  variables = timm_port.from_timm(str(tmp_path / 'snap'), arch)
  info = timm_port.describe(str(tmp_path / 'snap'), arch)
  data = timm.data.resolve_data_config(model=model)
  assert info['preprocessing'].interpolation == data['interpolation']
  assert info['preprocessing'].resize == int(data['input_size'][1] / data['crop_pct'])
  apply = jax.jit(models.create(arch, 1000).apply)
  for i, (h, w) in enumerate(((224, 224), (193, 257))):
    x = reference_weights.random_inputs(700 + i, (2, h, w, 3))
    ref = logits_of(model, x)
    y = np.asarray(apply(variables, x))
    err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
    print(f'live timm {arch} {h}x{w}: max|dlogits| = {err:.3g} (max|logits| = {scale:.4g}, '
          f'torch {torch.__version__}, timm {timm.__version__})')
    assert err <= 1e-4 * max(1.0, scale)


def _randomize_norms_and_biases(model, seed):
  """timm's init leaves norm affines at 1/0, BN statistics at 0/1 and layer scales at 1e-6,
  which would hide mapping bugs; every such tensor gets seeded random values."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      if leaf == 'bias':
        p.normal_(0, 0.1)
      elif leaf == 'gamma' or (leaf == 'weight' and p.ndim == 1):   # layer scale, norm scales
        p.uniform_(0.5, 1.5)


@pytest.mark.reference
@pytest.mark.parametrize('arch', ('mobilenetv3_large_100', 'efficientnet_b0', 'convnext_tiny',
                                  'vit_small_patch16_224', 'vit_base_patch16_224'))
def test_live_from_timm_for_every_family(arch, tmp_path):
  """Every family's converter behind from_timm, on a real timm model saved by timm's hub writer
  (model.safetensors + config.json with model_args); parity per family is in its own tests."""
  import timm
  from timm.models._hub import save_for_hf
  sys.path.insert(0, os.path.dirname(HERE))
  from tools.fixtures_timm_resnet import logits_of
  if arch not in timm_port.CONVERTERS:
    pytest.skip(f'no timm converter for {arch} registered yet (_FAMILY_MODULES)')
  import torch
  torch.manual_seed(3)   # timm's own init draws the conv/linear weights
  model = timm.create_model(arch, pretrained=False).eval()
  _randomize_norms_and_biases(model, seed=4)
  save_for_hf(model, str(tmp_path / 'snap'), safe_serialization=True)
  variables = timm_port.from_timm(str(tmp_path / 'snap'), arch)
  pp = timm_port.describe(str(tmp_path / 'snap'), arch)['preprocessing']
  assert pp == catalog.lookup('timm', arch).preprocessing
  apply = jax.jit(models.create(arch, 1000).apply)
  sizes = ((224, 224),) if arch.startswith('vit') else ((224, 224), (193, 257))
  for i, (h, w) in enumerate(sizes):
    x = reference_weights.random_inputs(900 + i, (2, h, w, 3))
    ref, y = logits_of(model, x), np.asarray(apply(variables, x))
    err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
    print(f'live timm {arch} {h}x{w}: max|dlogits| = {err:.3g} (max|logits| = {scale:.4g})')
    assert err <= 1e-4 * max(1.0, scale)
