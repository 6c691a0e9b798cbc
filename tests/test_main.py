"""Launch configs: every recipe validates, and bad overrides fail fast with a clear message."""

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from tljax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _module(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path, arg=None):
  module = _module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def documented_commands(path):
  """Every `python -m tljax.main` command in a recipe's docstring: (config file, arg, overrides)."""
  doc = _module(path).__doc__ or ''
  text = re.sub(r'\\\n\s*', ' ', doc)   # join backslash-continued lines
  commands = []
  for line in text.splitlines():
    at = line.find('python -m tljax.main ')
    if at < 0:
      continue
    words = shlex.split(line[at:], comments=True)
    spec = next(w.split('=', 1)[1] for w in words if w.startswith('--config='))
    file, _, arg = spec.partition(':')
    overrides = [w[len('--config.'):].split('=', 1)[0] for w in words if w.startswith('--config.')]
    commands.append((file, arg, overrides))
  return commands


def _set_field(cfg, dotted):
  """Walks `phases[1].bn`-style override paths; KeyError/IndexError if the field does not exist."""
  obj = cfg
  for part in dotted.split('.'):
    name, _, index = part.partition('[')
    obj = obj[name]
    if index:
      obj = obj[int(index[:-1])]
  return obj


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_documented_command_loads_and_validates(path):
  commands = documented_commands(path)
  name = os.path.basename(path)
  assert commands, f'{name} documents no `python -m tljax.main --config=configs/{name}` command'
  assert any(file == 'configs/' + name for file, _, _ in commands)
  for file, arg, overrides in commands:
    cfg = load(os.path.join(ROOT, file), arg)
    for field in overrides:
      _set_field(cfg, field)
    with cfg.unlocked():
      cfg.data.source = 'synthetic'   # folder roots of the recipes need not exist here
    config_lib.validate(cfg)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_recipe_argument_value_has_a_documented_command(path):
  """A recipe that serves several models (or cuts) documents how to launch each of them."""
  choices = getattr(_module(path), 'ARGS', {})
  documented = [config_lib.config_args(arg, **choices) for _, arg, _ in documented_commands(path)]
  for key, values in choices.items():
    assert set(values) <= {d[key] for d in documented}, (key, values)


def _arg_combinations(path):
  choices = getattr(_module(path), 'ARGS', {})
  return [''] + [f'{k}={v}' for k, values in choices.items() for v in values]


@pytest.mark.parametrize('path, arg', [(p, a) for p in CONFIGS for a in _arg_combinations(p)],
                         ids=lambda x: os.path.basename(x) if x.endswith('.py') else x)
def test_tiny_switch_gives_a_small_synthetic_run(path, arg):
  cfg = load(path, ','.join(filter(None, (arg, 'tiny'))))
  config_lib.validate(cfg)
  assert cfg.data.source == 'synthetic' and cfg.model.name.endswith(('_tiny', '_test'))
  assert cfg.pretrained.source == 'none' and all(p.epochs <= 1 for p in cfg.phases)


@pytest.mark.parametrize('field, value, message', [
    ('phases[0].optimizer', 'adamx', "phases\\[0\\].optimizer='adamx' is invalid; use one of"),
    ('phases[0].bn', 'off', "bn='off' is invalid"),
    ('phases[0].lr', -1.0, 'expected > 0'),
    ('phases[0].schedule', 'linear', "schedule='linear' is invalid; use one of 'constant', 'cosine'"),
    ('phases[0].trainable', 'backbone', "unknown trainable term 'backbone'; use .+-joined terms"),
    ('phases[0].trainable', 'head+top:0', "term 'top:0' needs a count N >= 1"),
    ('phases[0].trainable', 're:(', 'bad regex'),
    ('phases[0].warmup_epochs', 5.0, 'longer than the phase'),
    ('loss.kind', 'hinge', "loss.kind='hinge' is invalid"),
    ('loss.label_smoothing', 1.5, 'expected 0 <= smoothing < 1'),
    ('model.name', 'resnet35', "model.name='resnet35' is invalid"),
    ('model.head.pool', 'mean', "use one of 'avg', 'max', 'flatten'"),
    ('model.head.activation', 'tanh', "activation='tanh' is invalid; use one of 'relu'"),
    ('model.dtype', 'float16', "use one of 'float32', 'bfloat16'"),
    ('pretrained.source', 'hub', "use one of 'none', 'dir', 'efficientnet_lite'"),
    ('preprocessing', 'caffe', "use one of '', 'torchvision', 'keras_tf', 'efficientnet_lite'"),
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


def test_cli_rejects_a_bad_recipe_argument_in_one_line_naming_the_choices(tmp_path):
  out = _main('--config=configs/monkeys.py:model=vgg16,tiny', f'--workdir={tmp_path}')
  assert out.returncode == 2
  assert "model='vgg16' is invalid; use one of resnet34, cnn_scratch, mobilenet_v1" in out.stderr
  assert 'Traceback' not in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = _main('--config=configs/cats_dogs_inception.py:mixed7', f'--workdir={tmp_path}')
  assert out.returncode == 2 and '(write cut=mixed7)' in out.stderr
  assert not os.listdir(tmp_path)
