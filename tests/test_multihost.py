"""Multi-host training through `jax.distributed`: 2 CPU processes x 2 devices == 1 process x 4.

Every process runs the same `python -m tljax.main --distributed ...` command
(gloo collectives on CPU). With BatchNorm frozen and no dropout, the same
global batches give the same gradients, so the final parameters must match a
single-process run on 4 devices up to float reduction order, and the gathered
eval metrics must count each example exactly once. A second 2-process launch
resumes from a mid-phase orbax checkpoint and must land on the same weights;
a third runs `--mode=eval` on the restored checkpoint.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300   # three JAX processes share 2 cores in CI; a hang still fails

CONFIG = '''
from tljax.config import base_config, phase, tiny

def get_config():
  c = tiny(base_config())
  c.data.update(dict(num_train=48, num_val=22, num_test=18))  # eval batches of 8: padded + masked
  c.batch_size = 8
  c.eval_batch_size = 8
  c.phases = (phase('head', epochs=1, trainable='head', optimizer='sgd', lr=0.1),
              phase('all', epochs=1, trainable='all', optimizer='sgd', lr=0.05, bn='frozen'))
  c.checkpoint.every_steps = 4
  c.log.progress = False
  c.lock()
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(config: str, workdir: str, devices: int, extra=(), log: str = '') -> subprocess.Popen:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  log = log or workdir + '.log'
  with open(log, 'w') as f:   # a file, not a pipe: a full pipe would block the child
    proc = subprocess.Popen([sys.executable, '-m', 'tljax.main', f'--config={config}',
                             f'--workdir={workdir}', *extra], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _distributed(config: str, workdir: str) -> list[subprocess.Popen]:
  address = f'127.0.0.1:{_free_port()}'
  return [_start(config, workdir, 2, ['--distributed', f'--coordinator_address={address}',
                                      '--num_processes=2', f'--process_id={i}'],
                 log=f'{workdir}.{i}.log')
          for i in range(2)]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
  """Outputs of all processes; a hang or a failure fails the test (and kills the rest)."""
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [open(p.log).read() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, f'{p.args[-1]}: exit {p.returncode}:\n{out[-4000:]}'
  return outs


def _weights(workdir: str) -> dict:
  return load_file(os.path.join(workdir, 'export', 'weights.safetensors'))


def _assert_same_weights(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_two_processes_match_one_process_and_resume(tmp_path):
  config = tmp_path / 'cfg.py'
  config.write_text(CONFIG)
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  procs = _distributed(str(config), multi) + [_start(str(config), single, 4)]
  outs = _wait(procs)
  assert 'process 0 of 2: 2 local / 4 global devices' in outs[0]
  assert 'process 1 of 2: 2 local / 4 global devices' in outs[1]

  _assert_same_weights(_weights(single), _weights(multi))
  summaries = [json.load(open(os.path.join(w, 'summary.json'))) for w in (single, multi)]
  assert summaries[1]['processes'] == 2 and summaries[1]['devices'] == 4
  for split, n in (('val', 22), ('test', 18)):
    one, two = (s['final'][split] for s in summaries)
    assert one['count'] == two['count'] == n
    assert np.sum(two['confusion']) == n
    assert one['accuracy'] == two['accuracy'] and one['confusion'] == two['confusion']
    np.testing.assert_allclose(one['loss'], two['loss'], rtol=1e-5)
  # Only process 0 writes: the metrics log has one line per record, as in the 1-process run.
  records = [[json.loads(line) for line in open(os.path.join(w, 'metrics.jsonl'))]
             for w in (single, multi)]
  keys = [[(r['kind'], r['step']) for r in rs] for rs in records]
  assert keys[0] == keys[1]

  # Resume across processes: drop the final checkpoint so the run restarts mid-phase at step 8.
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['12', '8']
  shutil.rmtree(os.path.join(multi, 'checkpoints', '12'))
  shutil.rmtree(os.path.join(multi, 'export'))
  outs = _wait(_distributed(str(config), multi))
  assert 'resuming from step 8' in outs[0], outs[0][-3000:]
  _assert_same_weights(_weights(single), _weights(multi))

  # --mode=eval restores on both processes and gathers their halves of every batch.
  address = f'127.0.0.1:{_free_port()}'
  _wait([_start(str(config), multi, 2, ['--mode=eval', '--distributed',
                                        f'--coordinator_address={address}', '--num_processes=2',
                                        f'--process_id={i}'], log=f'{multi}.eval{i}.log')
         for i in range(2)])
  result = json.load(open(os.path.join(multi, 'eval_val.json')))
  assert result['count'] == 22 and result['step'] == 12
  assert result['accuracy'] == summaries[0]['final']['val']['accuracy']
  np.testing.assert_allclose(result['loss'], summaries[0]['final']['val']['loss'], rtol=1e-5)


PREEMPT_CONFIG = CONFIG.replace("c.checkpoint.every_steps = 4", "c.checkpoint.every_steps = 0") \
    .replace("phase('head', epochs=1,", "phase('head', epochs=40,")


def test_sigterm_on_one_host_saves_the_same_step_on_every_host(tmp_path):
  """JAX's preemption sync point: the signalled host and the other agree on one step, save, exit."""
  import signal
  import time
  config = tmp_path / 'cfg.py'
  config.write_text(PREEMPT_CONFIG)
  workdir = str(tmp_path / 'multi')
  procs = _distributed(str(config), workdir)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    p.wait(timeout=TIMEOUT_S)
  outs = [open(p.log).read() for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs
  saved = [int(out.split('saved the checkpoint of step ')[1].split()[0]) for out in outs]
  assert saved[0] == saved[1], saved
  assert str(saved[0]) in os.listdir(os.path.join(workdir, 'checkpoints'))
