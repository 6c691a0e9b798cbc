"""Data loading and `tljax.inspect_data` against a hostile or unlucky dataset.

Symlinks leading out of the root, the same image in train and val, and bad
command lines: each must be skipped with a reason, warned about in one line,
or refused in one line, never followed silently or raised as a traceback.
"""

import json
import logging
import os
import shutil

import ml_collections
import numpy as np
import pytest

from tests import data_fixtures as fx
from tljax import inspect_data
from tljax.data import StreamingSplit, default_data_config, load_splits
from tljax.data.config import validate_data_config
from tljax.data.duplicates import cross_split_duplicates, duplicate_groups
from tljax.data.split import Split


_cfg = fx.folder_config


def _messages(caplog, text):
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def linked(tmp_path):
  """animals10 root with an outside class folder and an outside file linked in, plus an inside link."""
  root = fx.animals10(str(tmp_path / 'data'), {'cane': 4, 'cavallo': 4})
  fx.write_class_dir(str(tmp_path / 'elsewhere' / 'gatto'), 2, 3)
  os.symlink(tmp_path / 'elsewhere' / 'gatto', tmp_path / 'data' / 'gatto')
  os.symlink(tmp_path / 'elsewhere' / 'gatto' / 'img_000.jpg', tmp_path / 'data' / 'cane' / 'out.jpg')
  os.symlink(tmp_path / 'data' / 'cane', tmp_path / 'data' / 'cane' / 'loop')   # a cycle, inside
  return root


def test_symlinks_out_of_the_root_are_skipped_with_a_reason(linked, caplog):
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_cfg(linked, val_fraction=0.25), load_size=16, seed=0)
  train, val = splits['train'], splits['val']
  assert train.class_names == ['cane', 'cavallo']                    # no class from outside
  assert len(train) + len(val) == 8 and not any('elsewhere' in i for i in train.ids + val.ids)
  skipped = dict(train.skipped)
  assert set(skipped) == {os.path.join(linked, 'gatto'), os.path.join(linked, 'cane', 'out.jpg')}
  for path, reason in skipped.items():
    assert 'outside the data root' in reason and 'data.follow_symlinks=True' in reason
    assert _messages(caplog, f'skipping {path}: symlink to ')


def test_follow_symlinks_reads_them_and_survives_a_cycle(linked):
  splits = load_splits(_cfg(linked, follow_symlinks=True, val_fraction=0.25), load_size=16, seed=0)
  train, val = splits['train'], splits['val']
  assert train.class_names == ['cane', 'cavallo', 'gatto']
  counts = train.class_counts() + val.class_counts()
  assert list(counts) == [5, 4, 3] and train.skipped == []         # cane: 4 + out.jpg, loop once


def test_links_inside_the_root_are_followed(tmp_path):
  root = fx.animals10(str(tmp_path), {'cane': 3, 'cavallo': 3})
  extra = tmp_path / 'cane' / 'more'
  fx.write_class_dir(str(tmp_path / 'spare'), 0, 2, start=10)
  os.symlink(tmp_path / 'spare', extra)
  cfg = _cfg(root, classes=('cane', 'cavallo'), val_fraction=0.3)
  splits = load_splits(cfg, load_size=16, seed=0)
  assert sum(s.class_counts()[0] for s in splits.values()) == 5 and splits['train'].skipped == []


def test_split_layout_outside_class_and_split_links(tmp_path):
  root = fx.monkeys(str(tmp_path / 'data'), per_class=(3, 2), num_classes=2, nested=False)
  fx.write_class_dir(str(tmp_path / 'elsewhere' / 'n7'), 3, 2)
  os.symlink(tmp_path / 'elsewhere' / 'n7', tmp_path / 'data' / 'validation' / 'n7')
  cfg = _cfg(root, train_split='training', val_split='validation')
  splits = load_splits(cfg, load_size=16, seed=0)
  assert splits['val'].class_names == ['n0', 'n1']
  assert [p for p, _ in splits['val'].skipped] == [os.path.join(root, 'validation', 'n7')]
  assert splits['train'].skipped == []
  shutil.move(tmp_path / 'data' / 'validation', tmp_path / 'elsewhere' / 'validation')
  os.symlink(tmp_path / 'elsewhere' / 'validation', tmp_path / 'data' / 'validation')
  with pytest.raises(ValueError, match='outside the data root; set data.follow_symlinks=True'):
    load_splits(cfg, load_size=16, seed=0)


def test_streamed_splits_carry_the_skipped_links(linked):
  splits = load_splits(_cfg(linked, cache_budget_mb=1e-4), load_size=16, seed=0)
  assert isinstance(splits['train'], StreamingSplit)
  assert len(splits['train'].skipped) == 2


def test_follow_symlinks_is_validated():
  cfg = ml_collections.ConfigDict({**default_data_config().to_dict(), 'follow_symlinks': 'yes'})
  with pytest.raises(ValueError, match="follow_symlinks='yes' is invalid; expected True or False"):
    validate_data_config(cfg)
  assert default_data_config().follow_symlinks is False


def _leaky_monkeys(tmp_path):
  root = fx.monkeys(str(tmp_path), per_class=(3, 2), num_classes=2, nested=False)
  shutil.copy(tmp_path / 'training' / 'n0' / 'img_000.jpg', tmp_path / 'validation' / 'n0' / 'a.jpg')
  shutil.copy(tmp_path / 'training' / 'n1' / 'img_001.jpg', tmp_path / 'validation' / 'n1' / 'b.jpg')
  shutil.copy(tmp_path / 'training' / 'n1' / 'img_002.jpg', tmp_path / 'training' / 'n1' / 'c.jpg')
  return root


def test_training_warns_once_about_cross_split_duplicates(tmp_path, caplog):
  root = _leaky_monkeys(tmp_path)
  with caplog.at_level(logging.WARNING):
    load_splits(_cfg(root, train_split='training', val_split='validation'), load_size=16, seed=0)
  lines = _messages(caplog, 'cross-split duplicates')
  assert len(lines) == 1 and '\n' not in lines[0]
  assert lines[0].startswith('data: 2 cross-split duplicates')      # the within-train copy is not
  assert f'python -m tljax.inspect_data --root={root}' in lines[0]
  assert 'train ' in lines[0] and 'val ' in lines[0]


def test_clean_splits_do_not_warn(tmp_path, caplog):
  root = fx.monkeys(str(tmp_path), per_class=(3, 2), num_classes=2, nested=False)
  with caplog.at_level(logging.WARNING):
    load_splits(_cfg(root, train_split='training', val_split='validation'), load_size=16, seed=0)
  assert not _messages(caplog, 'duplicates')


def test_duplicate_api():
  images = np.zeros((3, 4, 4, 3), np.uint8)
  images[1] += 1
  train = Split(images, [0, 1, 0], ['a', 'b'], ['t0', 't1', 't2'])
  val = Split(images[1:2].copy(), [1], ['a', 'b'], ['v0'])
  groups = cross_split_duplicates({'train': train, 'val': val})
  assert [g['members'] for g in groups] == [[('train', 't1'), ('val', 'v0')]]
  within = duplicate_groups([('train', 'x', 'k'), ('train', 'y', 'k'), ('val', 'z', 'j')])
  assert within == [{'hash': 'k', 'paths': ['x', 'y'], 'splits': ['train'], 'cross_split': False}]


def _inspect(capsys, *args):
  code = inspect_data.main(list(args))
  out, err = capsys.readouterr()
  return code, out, err


def test_inspect_fails_on_cross_split_duplicates_unless_allowed(tmp_path, capsys):
  root = _leaky_monkeys(tmp_path)
  code, out, _ = _inspect(capsys, f'--root={root}', '--json')
  report = json.loads(out)
  assert code == 1 and not report['ok']
  assert sum(d['cross_split'] for d in report['duplicates']) == 2
  assert any('--allow_duplicates' in p for p in report['problems'])
  code, out, _ = _inspect(capsys, f'--root={root}', '--json', '--allow_duplicates')
  assert code == 0 and json.loads(out)['ok']


def test_inspect_skips_outside_links_like_training(linked, capsys):
  code, out, _ = _inspect(capsys, f'--root={linked}', '--json')
  report = json.loads(out)
  assert code == 0 and report['classes'] == ['cane', 'cavallo']
  links = {s['path']: s for s in report['skipped']}
  assert set(links) == {os.path.join(linked, 'gatto'), os.path.join(linked, 'cane', 'out.jpg')}
  assert all('outside the data root' in s['reason'] and 'set --follow_symlinks' in s['reason']
             and s['split'] == 'all' for s in links.values())
  code, out, _ = _inspect(capsys, f'--root={linked}', '--json', '--follow_symlinks')
  report = json.loads(out)
  assert report['classes'] == ['cane', 'cavallo', 'gatto'] and report['skipped'] == []
  assert code == 0                                       # a copy within one split is no leak
  assert [sorted(map(os.path.basename, d['paths'])) for d in report['duplicates']] == [
      ['img_000.jpg', 'out.jpg']]


@pytest.mark.parametrize('args,expected', [
    (('--splits=nope',), "--splits names 'nope', which is not a folder of"),
    (('--threads=-1',), '--threads=-1; expected >= 0'),
    (('--label_file=missing.txt',), 'does not exist'),
])
def test_inspect_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, expected):
  root = fx.animals10(str(tmp_path), {'cane': 1, 'cavallo': 1})
  code, out, err = _inspect(capsys, f'--root={root}', *args)
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert code == 2 and len(lines) == 1 and expected in lines[0] and out == ''


def test_inspect_unreadable_folder_is_one_line(tmp_path, capsys, monkeypatch):
  root = fx.animals10(str(tmp_path), {'cane': 1, 'cavallo': 1})
  real_scandir = os.scandir

  def scandir(path):
    if str(path).endswith('cavallo'):
      raise PermissionError(13, 'Permission denied', str(path))
    return real_scandir(path)

  monkeypatch.setattr(os, 'scandir', scandir)
  code, _, err = _inspect(capsys, f'--root={root}')
  assert code == 2 and err.strip() == (f'error: cannot read {root}/cavallo: Permission denied; '
                                       'check the path and its permissions')


def test_inspect_empty_root_is_a_problem(tmp_path, capsys):
  code, out, _ = _inspect(capsys, f'--root={tmp_path}', '--json')
  report = json.loads(out)
  assert code == 1 and any('no class folders' in p for p in report['problems'])


def test_inspect_unknown_tfds_name_is_short(capsys):
  code, _, err = _inspect(capsys, '--tfds=no_such_dataset_xyz')
  assert code == 2 and err.count('\n') == 1 and 'Available datasets' not in err
  assert err.startswith("error: tfds has no dataset 'no_such_dataset_xyz'")
