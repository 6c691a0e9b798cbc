"""`python -m tljax.inspect_data`: counts, skipped files, duplicates, exit codes, JSON shape."""

import json
import os
import shutil
import subprocess
import sys

import tensorflow_datasets as tfds

from tests import data_fixtures as fx
from tljax import inspect_data


def _run(capsys, *args):
  code = inspect_data.main(list(args))
  return code, capsys.readouterr().out


def test_monkeys_report_with_zoo_and_leakage(tmp_path, capsys):
  root = fx.monkeys(str(tmp_path), per_class=(4, 2), num_classes=2, nested=True)
  train_n0 = tmp_path / 'training' / 'training' / 'n0'
  val_n1 = tmp_path / 'validation' / 'validation' / 'n1'
  fx.write_zoo(str(train_n0), 0)
  shutil.copy(train_n0 / 'img_000.jpg', val_n1 / 'leak.jpg')         # train/val leakage
  shutil.copy(train_n0 / 'img_001.jpg', train_n0 / 'copy.jpg')       # within train
  code, out = _run(capsys, f'--root={root}', '--json')
  assert code == 1                                                   # leakage fails the check
  assert not json.loads(out)['ok']
  code, out = _run(capsys, f'--root={root}', '--json', '--allow_duplicates')
  assert code == 0
  report = json.loads(out)
  assert {'classes', 'counts', 'skipped', 'duplicates'} <= set(report)
  assert report['classes'] == ['mantled_howler', 'patas_monkey']     # label file auto-detected
  assert report['splits'] == ['training', 'validation']
  usable_zoo = sum(kind != 'skip' for kind, _ in fx.ZOO.values())
  assert report['counts'] == {
      'training': {'mantled_howler': 4 + usable_zoo + 1, 'patas_monkey': 4},
      'validation': {'mantled_howler': 2, 'patas_monkey': 3}}
  skipped = {os.path.basename(s['path']): s['reason'] for s in report['skipped']}
  assert set(skipped) == {k for k, (kind, _) in fx.ZOO.items() if kind == 'skip'}
  assert all(set(s) >= {'path', 'reason'} for s in report['skipped'])
  groups = {frozenset(map(os.path.basename, d['paths'])): d for d in report['duplicates']}
  assert groups[frozenset({'img_000.jpg', 'leak.jpg'})]['cross_split']
  assert not groups[frozenset({'img_001.jpg', 'copy.jpg'})]['cross_split']
  # hashes are of decoded pixels: the same image as opaque RGBA, 16-bit and a
  # mis-named PNG is one duplicate group although the files differ byte-wise
  assert groups[frozenset({'alpha.png', 'rgb16.png', 'png_named.jpg'})]['splits'] == ['training']
  assert len(report['duplicates']) == 3
  assert report['imbalance']['training'] == round((4 + usable_zoo + 1) / 4, 3)
  code, text = _run(capsys, f'--root={root}')
  assert code == 1 and 'ACROSS SPLITS' in text and 'truncated' in text
  assert 'PROBLEM: 1 groups of identical images span splits' in text and '--allow_duplicates' in text


def test_empty_class_exits_nonzero(tmp_path, capsys):
  fx.animals10(str(tmp_path), {'cane': 3, 'cavallo': 2})
  os.makedirs(tmp_path / 'gatto')
  (tmp_path / 'gatto' / 'broken.jpg').write_bytes(b'')
  code, out = _run(capsys, f'--root={tmp_path}', '--json')
  report = json.loads(out)
  assert code == 1 and not report['ok']
  assert report['counts'] == {'all': {'cane': 3, 'cavallo': 2, 'gatto': 0}}
  assert any("'gatto' is empty" in p for p in report['problems'])
  assert report['imbalance']['all'] is None


def test_cli_entry_point_and_bad_arguments(tmp_path):
  fx.animals10(str(tmp_path), {'cane': 2, 'cavallo': 2})
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  done = subprocess.run([sys.executable, '-m', 'tljax.inspect_data', f'--root={tmp_path}',
                         '--json'], capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)['totals'] == {'all': 4}
  missing = subprocess.run([sys.executable, '-m', 'tljax.inspect_data', '--root=/nonexistent'],
                           capture_output=True, text=True, env=env, timeout=120)
  assert missing.returncode == 2 and 'not a directory' in missing.stderr


def test_tfds_report(tmp_path, capsys):
  with tfds.testing.mock_data(num_examples=6):
    code, out = _run(capsys, '--tfds=tf_flowers', f'--data_dir={tmp_path}', '--splits=train',
                     '--json')
  report = json.loads(out)
  assert report['source'] == 'tfds' and report['totals'] == {'train': 6}
  assert report['classes'][:2] == ['dandelion', 'daisy']
  assert code in (0, 1) and report['ok'] == (code == 0)   # 6 random labels may miss a class
