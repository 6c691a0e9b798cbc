"""`python -m tljax.port`: checksum gate, offline download message, a complete port.

No test touches the network: downloads go to a refused localhost port or a
patched `urlopen`. The successful port uses the real `torch.save`d
`resnet_tiny` fixture, registered in the catalog for the test (official
files are 45+ MB), and checks the written weights reproduce torchvision's
logits.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error

import jax
import numpy as np
import pytest

import reference_weights
from tljax import models, port
from tljax.data.preprocess import Preprocessing
from tljax.porting import torchvision as tv
from tljax.porting import weights_io
from tljax.porting.catalog import WeightSpec
from tljax.porting.merge import PortError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_PTH = os.path.join(HERE, 'fixtures', 'torch_pickles', 'resnet_tiny_zip.pth')
TINY_SHA256 = hashlib.sha256(open(TINY_PTH, 'rb').read()).hexdigest()


@pytest.fixture
def tiny_spec(monkeypatch):
  """A catalog entry for the tiny fixture, named like torchvision names its files."""
  spec = WeightSpec(source='torchvision', arch='resnet_tiny', num_classes=10, labels=[
      f'c{i}' for i in range(10)], url='http://127.0.0.1:9/resnet_tiny-' + TINY_SHA256[:8] + '.pth',
      filename=f'resnet_tiny-{TINY_SHA256[:8]}.pth', sha256=TINY_SHA256,
      preprocessing=Preprocessing(input_size=32, resize=36))
  monkeypatch.setitem(tv.CATALOG, 'resnet_tiny', spec)
  return spec


def test_port_writes_weights_that_reproduce_torchvision(tiny_spec, tmp_path):
  out = tmp_path / 'weights'
  meta = port.run_port('torchvision', 'resnet_tiny', str(out), input_path=TINY_PTH)
  variables, written = weights_io.load_weights(str(out))
  assert written == meta
  assert meta['sha256'] == TINY_SHA256 and meta['checksum_check'] == 'sha256'
  assert (meta['arch'], meta['source'], meta['num_classes']) == ('resnet_tiny', 'torchvision', 10)
  assert meta['url'] == tiny_spec.url and meta['source_file'] == 'resnet_tiny_zip.pth'
  assert Preprocessing.from_json(meta['preprocessing']) == tiny_spec.preprocessing
  assert meta['labels'] == [f'c{i}' for i in range(10)] and not meta['head_reinitialized']
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', 'torchvision',
                                                   'resnet_tiny.json'))
  case, ref = fx['inputs'][1], np.asarray(fx['logits'][1])
  x = reference_weights.random_inputs(case['seed'], case['shape'])
  y = np.asarray(jax.jit(models.create('resnet_tiny', 10).apply)(variables, x))
  assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_port_with_new_head_drops_the_label_names(tiny_spec, tmp_path):
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'w'), input_path=TINY_PTH,
                       num_classes=3)
  variables, _ = weights_io.load_weights(str(tmp_path / 'w'))
  assert variables['params']['head']['logits']['kernel'].shape == (16, 3)
  assert meta['num_classes'] == 3 and meta['labels'] is None and meta['head_reinitialized']


def test_checksum_mismatch_writes_nothing(tiny_spec, tmp_path):
  bad = tmp_path / tiny_spec.filename
  data = bytearray(open(TINY_PTH, 'rb').read())
  data[-100] ^= 1
  bad.write_bytes(bytes(data))
  out = tmp_path / 'out'
  with pytest.raises(PortError) as e:
    port.run_port('torchvision', 'resnet_tiny', str(out), input_path=str(bad))
  msg = str(e.value)
  assert 'checksum mismatch' in msg and str(bad) in msg and TINY_SHA256 in msg
  assert hashlib.sha256(bytes(data)).hexdigest() in msg and 'Nothing was written' in msg
  assert not out.exists()
  meta = port.run_port('torchvision', 'resnet_tiny', str(out), input_path=TINY_PTH)
  assert meta['sha256'] == TINY_SHA256  # the genuine file passes the same gate


def test_without_full_sha256_the_md5_or_filename_prefix_is_checked(tiny_spec, monkeypatch,
                                                                   tmp_path):
  monkeypatch.setitem(tv.CATALOG, 'resnet_tiny', dataclasses.replace(tiny_spec, sha256=None))
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'a'), input_path=TINY_PTH)
  assert meta['checksum_check'] == 'sha256-prefix' and meta['sha256'] == TINY_SHA256

  md5 = hashlib.md5(open(TINY_PTH, 'rb').read()).hexdigest()
  monkeypatch.setattr(tv, 'MD5', {'resnet_tiny': md5}, raising=False)
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'b'), input_path=TINY_PTH)
  assert meta['checksum_check'] == 'md5'
  monkeypatch.setattr(tv, 'MD5', {'resnet_tiny': '0' * 32})
  with pytest.raises(PortError, match=f'md5      {md5}\n  expected {"0" * 32}'):
    port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'c'), input_path=TINY_PTH)
  monkeypatch.setattr(tv, 'MD5', {})

  wrong = dataclasses.replace(tiny_spec, sha256=None, filename='resnet_tiny-00000000.pth')
  monkeypatch.setitem(tv.CATALOG, 'resnet_tiny', wrong)
  with pytest.raises(PortError, match=r'expected 00000000\.\.\.  \(prefix from the filename\)'):
    port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'd'), input_path=TINY_PTH)
  assert not (tmp_path / 'c').exists() and not (tmp_path / 'd').exists()

  unpublished = dataclasses.replace(tiny_spec, sha256=None, filename='resnet_tiny.pth')
  monkeypatch.setitem(tv.CATALOG, 'resnet_tiny', unpublished)
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'e'), input_path=TINY_PTH)
  assert meta['checksum_check'] == 'none published' and meta['sha256'] == TINY_SHA256


def test_download_verifies_and_ports(tiny_spec, monkeypatch, tmp_path):
  def fake_urlopen(url, timeout):
    assert url == tiny_spec.url and timeout == 5.0
    return open(TINY_PTH, 'rb')
  monkeypatch.setattr(port.urllib.request, 'urlopen', fake_urlopen)
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'w'),
                       download_url=tiny_spec.url, download_dir=str(tmp_path / 'dl'), timeout=5.0)
  assert meta['source_file'] == tiny_spec.filename
  assert os.listdir(tmp_path / 'dl') == [tiny_spec.filename]


def test_offline_download_names_the_url_and_the_command(monkeypatch, tmp_path):
  def offline(url, timeout):
    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
  monkeypatch.setattr(port.urllib.request, 'urlopen', offline)
  spec = tv.CATALOG['resnet34']
  with pytest.raises(PortError) as e:
    port.run_port('torchvision', 'resnet34', str(tmp_path / 'out'), download_url=spec.url,
                  download_dir=str(tmp_path / 'dl'), num_classes=10)
  msg = str(e.value)
  assert 'https://download.pytorch.org/models/resnet34-b627a593.pth' in msg
  assert ('python -m tljax.port --source=torchvision --arch=resnet34 '
          f'--input=/path/to/resnet34-b627a593.pth --output={tmp_path / "out"} --num_classes=10'
          ) in msg
  assert not (tmp_path / 'out').exists() and os.listdir(tmp_path / 'dl') == []


def test_cli_offline_download_fails_with_one_clear_message(tmp_path):
  url = 'http://127.0.0.1:9/resnet18-f37072fd.pth'  # nothing listens on the discard port
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'tljax.port', '--source=torchvision', '--arch=resnet18', '--download',
       f'--url={url}', f'--download_dir={tmp_path / "dl"}', f'--output={out}', '--timeout=5'],
      capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1, proc.stderr
  assert f'error: could not download {url}' in proc.stderr
  assert (f'python -m tljax.port --source=torchvision --arch=resnet18 '
          f'--input=/path/to/resnet18-f37072fd.pth --output={out}') in proc.stderr
  assert 'Traceback' not in proc.stderr and not out.exists()


def test_list_shows_every_torchvision_file():
  table = port.catalog_table(['torchvision'])
  for spec in tv.CATALOG.values():
    assert spec.url in table
  assert 'resnet50:IMAGENET1K_V2' in table and '232 shorter' in table


def test_list_shows_the_timm_hub_files():
  table = port.catalog_table(['timm'])
  assert 'resnet50:a1_in1k' in table and '235 shorter' in table
  assert 'https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/' \
         'model.safetensors' in table


def test_timm_through_run_port_and_its_input_errors(tmp_path):
  with pytest.raises(PortError, match='no such file or directory'):
    port.run_port('timm', 'resnet18', str(tmp_path / 'w'), input_path=str(tmp_path / 'x'))
  with pytest.raises(PortError, match='holds neither model.safetensors nor pytorch_model.bin'):
    port.run_port('timm', 'resnet18', str(tmp_path / 'w'), input_path=str(tmp_path))
  with pytest.raises(ValueError, match="no timm converter for 'resnet19'"):
    port.run_port('timm', 'resnet19', str(tmp_path / 'w'), input_path=str(tmp_path))
  with pytest.raises(ValueError, match='exactly one'):
    port.run_port('timm', 'resnet18', str(tmp_path / 'w'))
  proc = subprocess.run(
      [sys.executable, '-m', 'tljax.port', '--source=timm', '--arch=resnet18', '--download',
       '--url=http://mirror/x', f'--output={tmp_path / "w"}'],
      capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode != 0 and 'set HF_ENDPOINT' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_missing_input_and_unknown_arch(tmp_path):
  with pytest.raises(PortError, match='no such file'):
    port.run_port('torchvision', 'resnet18', str(tmp_path), input_path=str(tmp_path / 'x.pth'))
  with pytest.raises(ValueError, match='no torchvision weights for .resnet19.'):
    port.run_port('torchvision', 'resnet19', str(tmp_path), input_path=TINY_PTH)
  with pytest.raises(ValueError, match='exactly one'):
    port.run_port('torchvision', 'resnet18', str(tmp_path))


def test_unverified_port_of_a_non_catalog_file_records_its_hash(tiny_spec, tmp_path):
  other = tmp_path / 'finetuned.pth'
  shutil.copy(TINY_PTH, other)
  with open(other, 'ab') as f:
    f.write(b'\0')  # a different file (zip readers ignore trailing bytes)
  meta = port.run_port('torchvision', 'resnet_tiny', str(tmp_path / 'w'), input_path=str(other),
                       check=False)
  assert meta['checksum_check'] == 'skipped' and meta['sha256'] != TINY_SHA256
  assert json.load(open(tmp_path / 'w' / 'metadata.json'))['source_file'] == 'finetuned.pth'
