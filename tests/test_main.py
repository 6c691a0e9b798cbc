"""Launch configs: every recipe validates, and bad overrides fail fast with a clear message."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from tljax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_validates_and_documents_its_command(path):
  cfg = load(path)
  with cfg.unlocked():
    cfg.data.source = 'synthetic'   # folder roots of the recipes need not exist here
  config_lib.validate(cfg)
  for variant in cfg.variants:
    config_lib.validate(config_lib.apply_variant(cfg, variant))
  doc = open(path).read()
  assert 'python -m tljax.main --config=configs/' + os.path.basename(path) in doc


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_tiny_switch_gives_a_small_synthetic_run(path):
  cfg = load(path, 'tiny')
  config_lib.validate(cfg)
  assert cfg.data.source == 'synthetic' and cfg.model.name.endswith('_tiny')
  assert cfg.pretrained.source == 'none' and all(p.epochs <= 1 for p in cfg.phases)


@pytest.mark.parametrize('field, value, message', [
    ('phases[0].optimizer', 'adamx', "phases\\[0\\].optimizer='adamx' is invalid; use one of"),
    ('phases[0].bn', 'off', "bn='off' is invalid"),
    ('phases[0].lr', -1.0, 'expected > 0'),
    ('phases[0].trainable', 'backbone', 'use .+-joined terms'),
    ('phases[0].trainable', 're:(', 'bad regex'),
    ('phases[0].warmup_epochs', 5.0, 'longer than the phase'),
    ('loss.kind', 'hinge', "loss.kind='hinge' is invalid"),
    ('loss.label_smoothing', 1.5, 'expected 0 <= smoothing < 1'),
    ('model.name', 'resnet35', "model.name='resnet35' is invalid"),
    ('model.head.pool', 'mean', 'use one of'),
    ('batch_size', 0, 'expected >= 1'),
    ('data.val_fraction', 1.2, 'expected 0 <= fraction < 1'),
])
def test_invalid_values_are_rejected_with_the_field_and_the_fix(field, value, message):
  cfg = config_lib.base_config()
  target, _, leaf = field.rpartition('.')
  obj = cfg
  for part in filter(None, target.split('.')):
    obj = obj.phases[int(part[7:-1])] if part.startswith('phases[') else obj[part]
  if leaf.startswith('phases['):
    raise AssertionError('bad test spec')
  obj[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'tljax.main', *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)


def test_cli_rejects_unknown_keys_and_bad_values_before_any_work(tmp_path):
  out = _main('--config=configs/default.py:tiny', f'--workdir={tmp_path}', '--config.phases[0].lrr=1')
  assert out.returncode == 2
  assert 'unknown config key' in out.stderr and 'lrr' in out.stderr
  assert 'Traceback' not in out.stderr
  out = _main('--config=configs/default.py:tiny', f'--workdir={tmp_path}',
              '--config.phases[1].optimizer=adagrad')
  assert out.returncode == 2
  assert "phases[1].optimizer='adagrad' is invalid; use one of 'adam', 'adamw'" in out.stderr
  assert not os.listdir(tmp_path)
