"""The benchmark suite's code paths, on CPU with a tiny model (numbers are not checked).

The GPU run is one command on a lent machine, so everything it executes
except the device itself is exercised here: the bf16 XLA-path model timings
through the real train step, MFU tables, job planning for --gpu, the worker
protocol, and the README generator.
"""

import json

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


def test_perf_readme_replaces_its_section(tmp_path, tiny_row):
  path = tmp_path / 'bench.json'
  path.write_text(json.dumps({'meta': {'cpu': 'Test CPU', 'batch': 2}, 'micro': [],
                              'models': [tiny_row]}))
  readme = tmp_path / 'README.md'
  readme.write_text('# tljax\n\nIntro.\n')
  perf_readme.main([str(path), '--readme', str(readme)])
  once = readme.read_text()
  perf_readme.main([str(path), '--readme', str(readme)])
  assert readme.read_text() == once
  assert once.startswith('# tljax\n\nIntro.\n') and once.count(perf_readme.BEGIN) == 1
  assert '### CPU: Test CPU' in once and '| simple_cnn_tiny | bfloat16 | inference |' in once
