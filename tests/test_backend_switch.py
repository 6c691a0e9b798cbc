"""The CPU backend touches only CPU runs: GPU/TPU hosts and TLJAX_OPS=xla are never restarted.

`tljax.main` restarts itself (execve, same pid) under the allocator settings
(`tljax.cpu_backend.allocator`) so a CPU run stops paying page faults every
step. That restart, its LD_PRELOAD'ed block cache and its log line belong to
the CPU backend alone: a run that JAX will put on an accelerator
(JAX_PLATFORMS naming one first, or an accelerator plugin installed) or that
switched the backend off (TLJAX_OPS=xla) must start exactly once, with the
environment it was given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tljax import ops
from tljax.cpu_backend import allocator, native

from tests.test_recipes_tiny import ROOT, user_environment

GLIBC = allocator._is_glibc_linux()
glibc_only = pytest.mark.skipif(not GLIBC, reason='glibc tunables')

# Nothing the caller's shell may have set that decides the outcome.
_CLEAN = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'TLJAX_OPS', 'TLJAX_HOST_BLOCK_CACHE', 'JAX_PLATFORMS',
          'JAX_PLATFORM_NAME', 'TLJAX_MALLOC')


def _env(**values) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
  env['TLJAX_HOST_BLOCK_CACHE'] = '0'    # no compiler run for the pure decisions below
  env['TLJAX_MALLOC'] = 'glibc'          # the path every machine has; tcmalloc is tested below
  env.update(values)
  return env


@pytest.mark.parametrize('platforms', ['cuda', 'tpu', 'cuda,cpu', 'gpu', ' CUDA , cpu'])
def test_accelerator_platforms_are_never_restarted(platforms):
  assert not allocator.runs_on_cpu(_env(JAX_PLATFORMS=platforms))
  assert allocator.restart_environ(_env(JAX_PLATFORMS=platforms)) is None


def test_jax_platform_name_is_read_when_jax_platforms_is_unset():
  assert allocator.restart_environ(_env(JAX_PLATFORM_NAME='gpu')) is None


@pytest.mark.parametrize('ops_env', ['xla', 'XLA'])
def test_xla_backend_is_never_restarted_even_on_cpu(ops_env):
  assert allocator.restart_environ(_env(JAX_PLATFORMS='cpu', TLJAX_OPS=ops_env)) is None


def test_an_installed_accelerator_plugin_means_no_restart(monkeypatch):
  monkeypatch.setattr(allocator, 'accelerator_plugins', lambda: ['xla_cuda12'])
  assert not allocator.runs_on_cpu(_env())
  assert allocator.restart_environ(_env()) is None
  # JAX_PLATFORMS pins the platform whatever is installed.
  assert allocator.runs_on_cpu(_env(JAX_PLATFORMS='cpu'))
  if GLIBC:
    assert allocator.restart_environ(_env(JAX_PLATFORMS='cpu')) is not None


@glibc_only
@pytest.mark.parametrize('values', [dict(JAX_PLATFORMS='cpu'), dict(JAX_PLATFORMS='cpu,cuda'),
                                    dict(JAX_PLATFORMS='cpu', TLJAX_OPS='cpu'),
                                    dict(JAX_PLATFORMS='cpu', TLJAX_OPS='auto'), {}])
def test_cpu_runs_restart_with_the_tunables(monkeypatch, values):
  monkeypatch.setattr(allocator, 'accelerator_plugins', lambda: [])
  given = _env(OTHER='kept', **values)
  env = allocator.restart_environ(given)
  assert env is not None
  assert allocator.tunables_active(env) and not allocator.tunables_active(given)
  assert env['OTHER'] == 'kept'
  assert 'LD_PRELOAD' not in env           # TLJAX_HOST_BLOCK_CACHE=0
  assert allocator.restart_environ(env) is None, 'applied once, never again'


def test_not_glibc_means_no_restart(monkeypatch):
  monkeypatch.setattr(allocator, '_is_glibc_linux', lambda: False)
  assert allocator.restart_environ(_env(JAX_PLATFORMS='cpu')) is None


def test_a_bad_backend_name_is_an_error_naming_the_variable():
  with pytest.raises(ValueError, match='TLJAX_OPS'):
    allocator.restart_environ(_env(JAX_PLATFORMS='cpu', TLJAX_OPS='fast'))


# In process: what `tljax.main` does before anything else, with execve recorded instead of run.

@pytest.fixture
def execve(monkeypatch):
  """Calls to os.execve, recorded (and not made); the environment cleaned of the switches."""
  for name in _CLEAN:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(allocator, 'accelerator_plugins', lambda: [])
  calls = []
  monkeypatch.setattr(os, 'execve', lambda path, argv, env: calls.append((path, argv, dict(env))))
  return calls


def _restart_tuned():
  from tljax import main  # noqa: PLC0415
  main._restart_tuned()
  blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
  assert signal.SIGTERM not in blocked, 'SIGTERM left blocked after the restart decision'


@pytest.mark.parametrize('platforms', ['cuda', 'tpu', 'cuda,cpu'])
def test_main_does_not_restart_on_accelerators(monkeypatch, execve, platforms):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  _restart_tuned()
  assert execve == []


def test_main_does_not_restart_where_a_plugin_is_installed(monkeypatch, execve):
  monkeypatch.setattr(allocator, 'accelerator_plugins', lambda: ['libtpu'])
  _restart_tuned()
  assert execve == []


def test_main_does_not_restart_with_the_backend_off(monkeypatch, execve):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('TLJAX_OPS', 'xla')
  _restart_tuned()
  assert execve == []


@glibc_only
@pytest.mark.parametrize('choice', ['', 'glibc', 'tcmalloc'])
def test_glibc_settings_by_default_tcmalloc_on_request(monkeypatch, choice):
  monkeypatch.setattr(allocator, 'accelerator_plugins', lambda: [])
  library = '/usr/lib/libtcmalloc_minimal.so.4'
  monkeypatch.setattr(allocator, 'tcmalloc_library', lambda: library)
  env = allocator.restart_environ(_env(JAX_PLATFORMS='cpu', TLJAX_MALLOC=choice,
                                       LD_PRELOAD='/opt/user.so'))
  if choice == 'tcmalloc':
    assert env['LD_PRELOAD'] == f'{library}:/opt/user.so'
    assert not allocator.tunables_active(env)
  else:
    assert allocator.tunables_active(env) and env['LD_PRELOAD'] == '/opt/user.so'
  assert allocator.restart_environ(env) is None, 'applied once, never again'


def test_bad_or_unmet_malloc_choice_is_an_error_naming_it(monkeypatch):
  with pytest.raises(ValueError, match='TLJAX_MALLOC'):
    allocator.malloc_choice({'TLJAX_MALLOC': 'auto'})
  monkeypatch.setattr(allocator, 'tcmalloc_library', lambda: None)
  with pytest.raises(ValueError, match='libtcmalloc-minimal4'):
    allocator.malloc_choice({'TLJAX_MALLOC': 'tcmalloc'})


@glibc_only
def test_main_restarts_a_cpu_run_once_with_the_tunables(monkeypatch, execve):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('TLJAX_MALLOC', 'glibc')
  _restart_tuned()
  (path, argv, env), = execve
  assert path == sys.executable and argv[0] == sys.executable
  assert allocator.tunables_active(env) and env['JAX_PLATFORMS'] == 'cpu'
  if native._compiler() is not None:
    first = env['LD_PRELOAD'].split(':')[0]
    assert 'tljax_hostalloc_' in os.path.basename(first) and os.path.exists(first), env['LD_PRELOAD']


def test_log_line_only_when_the_cpu_backend_runs(monkeypatch, capsys):
  from tljax import main  # noqa: PLC0415
  monkeypatch.setenv('TLJAX_OPS', 'xla')
  main._log_backend()
  assert capsys.readouterr() == ('', '')
  monkeypatch.setenv('TLJAX_OPS', 'cpu')
  main._log_backend()
  out, err = capsys.readouterr()
  assert out == '' and len(err.splitlines()) == 1 and err.startswith('CPU backend: ')
  assert ops.active_backend() == 'cpu'


# End to end: the README's test mode, as a user runs it. Every interpreter start is counted by a
# sitecustomize on PYTHONPATH; a restart is a second start with the same pid (execve).
_SITECUSTOMIZE = textwrap.dedent('''
    import os, sys
    sys.stderr.write(f'tljax-test-start {os.getpid()} {"GLIBC_TUNABLES" in os.environ}\\n')
    sys.stderr.flush()
''')


def _launch(tmp_path, name, **values):
  site = tmp_path / 'site'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
  env = {k: v for k, v in user_environment().items() if k not in _CLEAN}
  env.update(JAX_PLATFORMS='cpu', **values)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, (str(site), env.get('PYTHONPATH'))))
  cmd = [sys.executable, '-m', 'tljax.main', '--config=configs/default.py:tiny',
         f'--workdir={tmp_path / name}']
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, f'rc {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}'
  starts = [line.split()[2] for line in err.splitlines()
            if line.startswith(f'tljax-test-start {proc.pid} ')]
  return starts, [line for line in err.splitlines() if line.startswith('CPU backend:')]


@pytest.mark.slow
def test_tiny_run_restarts_only_with_the_cpu_backend(tmp_path):
  # Both at once: on 2 cores one run's tracing overlaps the other's compiling.
  xla = _launch(tmp_path, 'xla', TLJAX_OPS='xla')
  default = _launch(tmp_path, 'default')
  starts, lines = _finish(xla)
  assert starts == ['False'], f'TLJAX_OPS=xla started {len(starts)} times: {starts}'
  assert lines == []
  starts, lines = _finish(default)
  assert starts == (['False', 'True'] if GLIBC else ['False']), starts
  assert len(lines) == 1, lines
  if GLIBC:
    assert ('glibc malloc tunables' in lines[0] or 'tcmalloc' in lines[0]), lines[0]
  if native._compiler() is not None:
    assert lines[0].startswith('CPU backend: C++ kernels'), lines[0]
