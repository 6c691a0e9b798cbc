"""The benchmark suite's code paths, on CPU with a tiny model (numbers are not checked).

The GPU run is one command on a lent machine, so everything it executes
except the device itself is exercised here: the bf16 XLA-path model timings
through the real train step, MFU tables, job planning for --gpu, the worker
protocol, and the docs/performance.md generator.
"""

import json
import pathlib

import pytest

from experiments import bench_tables, bench_tljax, benchmark
from tools import perf_readme


@pytest.fixture(scope='module')
def tiny_row():
  # The --gpu configuration (bf16, XLA convs) on a tiny model; the worker test runs 'fast'.
  return bench_tljax.run_model('simple_cnn_tiny', batch=2, dtype='bfloat16', impls=('xla',),
                               iters=1, warmup=1)


def test_tljax_model_timings(tiny_row):
  assert tiny_row['input_size'] == 32 and tiny_row['dtype'] == 'bfloat16'
  for mode in bench_tables.MODES:
    timing = tiny_row['results']['tljax-xla'][mode]
    assert 'error' not in timing, timing
    assert timing['median_s'] > 0 and len(timing['samples']) == 1
  assert tiny_row['flops']['inference'] > 0
  state = tiny_row['opt_state_bytes']
  assert 0 < state['head_only'] < state['full']


def test_gpu_tables_report_mfu(tiny_row):
  suite = {'meta': {'gpu': True, 'peak_tflops': 989.0, 'batch': 2, 'versions': {'jax': 'x'}},
           'models': [dict(tiny_row, results={
               'tljax-xla': tiny_row['results']['tljax-xla'],
               'torch-eager': {'inference': {'median_s': 0.01}},
               'torch-compile': {'inference': {'error': 'RuntimeError: no compiler'}}})],
           'micro': []}
  text = bench_tables.markdown(suite)
  assert 'MFU tljax-xla' in text and 'tljax-xla ÷ torch-eager' in text
  inference = next(l for l in text.splitlines() if '| inference |' in l)
  assert inference.count('%') == 2 and inference.endswith('| n/a |')  # torch.compile failed
  assert 'peak of 989.0 TFLOP/s' in text


def test_gpu_job_plan():
  args = benchmark.parse_args(['--gpu', '--models=resnet50,mobilenet_v2'])
  assert (args.batch, args.dtypes, args.impls, args.micro) == (128, 'bfloat16', 'xla', False)
  assert args.budget_s == 500  # ends inside the device tool's 10-minute command limit
  jobs = [(job['kind'], job['model']) for job in benchmark.jobs(args)]
  assert jobs == [('tljax', 'resnet50'), ('torch-eager', 'resnet50'), ('tljax', 'mobilenet_v2'),
                  ('torch-eager', 'mobilenet_v2'), ('torch-compile', 'resnet50'),
                  ('torch-compile', 'mobilenet_v2')]  # slow-to-start compile last
  cpu_kinds = [job['kind'] for job in benchmark.jobs(benchmark.parse_args(['--models=resnet50']))]
  assert cpu_kinds == ['micro-jax', 'micro-torch', 'tljax', 'torch-eager', 'keras', 'torch-compile']


def test_worker_protocol_and_missing_framework(capsys):
  spec = dict(kind='tljax', model='simple_cnn_tiny', dtype='float32', batch=2, iters=1, warmup=1,
              gpu=False, size=None, malloc='tuned', threads=1, modes=['inference'],
              impls=['fast'])
  result = benchmark.launch(spec, timeout=300)
  assert result['results']['tljax-fast']['inference']['median_s'] > 0
  missing = benchmark.launch(dict(spec, kind='no-such-framework'), timeout=300)
  assert 'error' in missing
  suite = {'meta': {}, 'micro': [], 'models': []}
  benchmark.merge(spec, result, suite, {})
  benchmark.merge(dict(spec, kind='torch-eager'), missing, suite, {})
  assert suite['models'][0]['results']['torch-eager'] == {'error': missing['error']}


def test_perf_readme_regenerates_its_part_of_the_doc(tmp_path, tiny_row):
  bench = dict(meta={'cpu': 'Test CPU', 'batch': 2, 'date': '2026-01-02 00:00 UTC',
                     'git': 'abc1234', 'warmup': 1, 'native_kernels': 'on'},
               micro=[], models=[tiny_row])
  for name, date in (('run_new.json', '2026-01-02'), ('run_old.json', '2026-01-01')):
    meta = dict(bench['meta'], date=f'{date} 00:00 UTC', git=name[4:7])
    (tmp_path / name).write_text(json.dumps(dict(bench, meta=meta)))
  doc = tmp_path / 'performance.md'
  doc.write_text('# Performance\n\nBy hand, before.\n')
  argv = [str(tmp_path / 'run_new.json'), '--history', str(tmp_path / 'run_*.json'),
          '--out', str(doc)]
  perf_readme.main(argv)
  doc.write_text(doc.read_text() + '\nBy hand, after.\n')
  once = doc.read_text()
  perf_readme.main(argv)
  assert doc.read_text() == once  # idempotent; hand-written text on both sides kept
  assert once.startswith('# Performance\n\nBy hand, before.\n') and once.endswith('after.\n')
  assert once.count(perf_readme.BEGIN) == 1
  assert '### CPU: Test CPU' in once and '| simple_cnn_tiny | bfloat16 | inference |' in once
  history = [l for l in once.splitlines() if l.startswith(('| old ', '| new '))]
  assert [l.split(' | ')[2] for l in history] == ['`run_old.json`', '`run_new.json`']  # by date
  assert all(l.count('n/a / n/a') == 3 for l in history)  # no tljax-fast/torch pair in the file


def test_perf_readme_defaults_are_committed_files(monkeypatch):
  # `python -m tools.perf_readme` with no arguments regenerates docs/performance.md.
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
  assert perf_readme.expand(perf_readme.RUNS) == perf_readme.RUNS
  assert len(perf_readme.expand(perf_readme.HISTORY)) > len(perf_readme.HISTORY)
  text = perf_readme.section(perf_readme.expand(perf_readme.RUNS),
                             perf_readme.expand(perf_readme.HISTORY))
  with open(perf_readme.OUT) as f:
    assert text in f.read()


def test_rounds_interleave_frameworks_and_run_extra_impls_once():
  args = benchmark.parse_args(['--rounds=3', '--models=resnet34,mobilenet_v2', '--no-micro',
                               '--frameworks=tljax,torch-eager'])
  plan = [(j['round'], j['kind'], j['model'], tuple(j['impls'])) for j in benchmark.jobs(args)]
  assert [p[:3] for p in plan] == [
      (0, 'tljax', 'resnet34'), (0, 'torch-eager', 'resnet34'),
      (0, 'tljax', 'mobilenet_v2'), (0, 'torch-eager', 'mobilenet_v2'),
      (1, 'torch-eager', 'resnet34'), (1, 'tljax', 'resnet34'),
      (1, 'torch-eager', 'mobilenet_v2'), (1, 'tljax', 'mobilenet_v2'),
      (2, 'tljax', 'resnet34'), (2, 'torch-eager', 'resnet34'),
      (2, 'tljax', 'mobilenet_v2'), (2, 'torch-eager', 'mobilenet_v2')]
  tljax_impls = [p[3] for p in plan if p[1] == 'tljax']
  assert tljax_impls == [('fast', 'xla')] * 2 + [('fast',)] * 4
  with pytest.raises(SystemExit, match='--rounds'):
    benchmark.parse_args(['--rounds=0'])


def _timing(*samples):
  return {'median_s': sorted(samples)[len(samples) // 2], 'min_s': min(samples),
          'samples': list(samples), 'first_call_s': 1.0}


def test_rounds_pool_samples_keep_round_medians_and_survive_a_failed_round():
  suite = {'meta': {'rounds': 3, 'batch': 4}, 'micro': [], 'models': []}
  job = dict(kind='tljax', model='m', dtype='float32', batch=4, impls=['fast'],
             modes=['inference', 'full_step'])
  peer = dict(job, kind='torch-eager')
  ours = [(1.0, 1.2, 1.1), (2.0, 2.2, 2.1), (1.5, 1.4, 1.6)]
  theirs = [(1.1, 1.3, 1.2), (2.6, 2.4, 2.5), (1.4, 1.5, 1.3)]
  for r in range(3):
    benchmark.merge(job, {'results': {'tljax-fast': {
        'inference': _timing(*ours[r]), 'full_step': _timing(*ours[r])}}}, suite, {})
    peer_result = ({'error': 'exit 1: boom', 'partial': {}} if r == 1 else
                   {'results': {'torch-eager': {'inference': _timing(*theirs[r]),
                                                'full_step': _timing(*theirs[r])}}})
    benchmark.merge(peer, peer_result, suite, {})
  results = suite['models'][0]['results']
  fast = results['tljax-fast']['inference']
  assert fast['samples'] == [s for r in ours for s in r]
  assert fast['median_s'] == 1.5 and fast['min_s'] == 1.0
  assert fast['round_medians'] == [1.1, 2.1, 1.5]
  torch = results['torch-eager']['full_step']
  assert torch['round_medians'] == [1.2, 1.4] and torch['round_errors'] == ['exit 1: boom']
  assert bench_tables.round_ratios(fast, torch) == []  # a missing round: no per-round ratios
  results['torch-eager']['inference'] = dict(torch, round_medians=[1.2, 2.5, 1.4])
  per_round = bench_tables.round_ratios(fast, results['torch-eager']['inference'])
  assert per_round == pytest.approx([1.2 / 1.1, 2.5 / 2.1, 1.4 / 1.5])
  text = bench_tables.markdown(suite)
  assert '0.93–1.19)' in text and 'in each of 3 rounds' in text


def test_a_framework_that_fails_every_round_stays_an_error():
  suite = {'meta': {}, 'micro': [], 'models': []}
  job = dict(kind='torch-eager', model='m', dtype='float32', batch=4, impls=[],
             modes=['inference'])
  for _ in range(2):
    benchmark.merge(job, {'error': 'exit 1: no torch', 'partial': {}}, suite, {})
  assert suite['models'][0]['results']['torch-eager'] == {'error': 'exit 1: no torch'}
