"""Shared fixtures and the suite's sandbox.

The sandbox: every process of a session (the xdist controller, its workers and the subprocesses they
start) gets ``HOME``, ``TFDS_DATA_DIR``, ``DESSILBI_DATA_DIR``, ``MPLCONFIGDIR`` and ``XDG_CACHE_HOME``
inside the session's temporary directory, so no test writes to ``~/tensorflow_datasets`` or ``~/.cache``
(the session fails if the real ``~/tensorflow_datasets`` changed). The processes share one JAX
compilation cache there too: the same program (the tiny LeNet's step, a subprocess's) compiles once.

Shared fixtures, made once per session even under xdist (a file lock in the session directory):
``data_dir`` (digits prepared; ``prepare_data('mnist1d')`` adds another dataset), ``tiny`` (a small
LeNet's :class:`TrainConfig`) and ``lenet_run`` (its 2-epoch run, read-only: tests copy it with
``copy_run`` and resume from the copy instead of training again). ``run`` is that run's private copy
with its :class:`TrainResult`.

Scheduling: a test that uses a module- or class-scoped fixture of its own module runs on the worker
that holds that fixture (``--dist loadgroup`` in pyproject.toml, the group named by
``pytest_collection_modifyitems``), so each such fixture is built once; other tests spread freely.
"""

import contextlib
import fcntl
import os
import pathlib
import pwd
import shutil
import sys
import tempfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `from tests import reference` wherever pytest is started from
  sys.path.insert(0, str(REPO))

# A small LeNet on digits: 11 steps of 128 examples per epoch, a second or so once compiled.
TINY = dict(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=2, lr=0.05)
_REAL_TFDS_DIR = pathlib.Path(pwd.getpwuid(os.getuid()).pw_dir) / 'tensorflow_datasets'


def _session_root(config) -> pathlib.Path:
  """One directory per session, the same in the xdist controller and all its workers."""
  factory = getattr(config, '_tmp_path_factory', None)
  if factory is None:
    return pathlib.Path(tempfile.mkdtemp(prefix='dessilbi-tests-'))
  base = factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def _snapshot(directory: pathlib.Path):
  if not directory.exists():
    return None
  return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in [directory, *directory.rglob('*')])


@pytest.hookimpl(trylast=True)   # after the tmpdir plugin has made config._tmp_path_factory
def pytest_configure(config):
  root = _session_root(config)
  config.dessilbi_root = root
  config.dessilbi_real_tfds = _snapshot(_REAL_TFDS_DIR)
  sandbox = {
      'HOME': root / 'home',
      'TFDS_DATA_DIR': root / 'data',
      'DESSILBI_DATA_DIR': root / 'data',
      'MPLCONFIGDIR': root / 'home' / '.config' / 'matplotlib',
      'XDG_CACHE_HOME': root / 'home' / '.cache',
      'JAX_COMPILATION_CACHE_DIR': root / 'jax_cache',
  }
  for name, path in sandbox.items():
    path.mkdir(parents=True, exist_ok=True)
    os.environ[name] = str(path)
  # Subprocesses read these from the environment; this process has imported jax already.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.3'
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.3)


def pytest_sessionfinish(session):
  config = session.config
  if os.environ.get('PYTEST_XDIST_WORKER') or not hasattr(config, 'dessilbi_real_tfds'):
    return
  if _snapshot(_REAL_TFDS_DIR) != config.dessilbi_real_tfds:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = config.pluginmanager.get_plugin('terminalreporter')
    if reporter:
      reporter.write_line(f'FAILED: a test wrote to {_REAL_TFDS_DIR} (tests write only into their temporary '
                          'directories; the default data directory is $DESSILBI_DATA_DIR)', red=True)


@pytest.hookimpl(tryfirst=True)   # before xdist names the groups of --dist loadgroup
def pytest_collection_modifyitems(items):
  for item in items:
    module = getattr(item, 'module', None)
    definitions = getattr(item, '_fixtureinfo', None)
    if module is None or definitions is None:
      continue
    if any(defs and defs[-1].scope != 'function' and defs[-1].func.__module__ == module.__name__
           for defs in map(definitions.name2fixturedefs.get, item.fixturenames)):
      item.add_marker(pytest.mark.xdist_group(module.__name__))


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _once(root: pathlib.Path, name: str, make) -> pathlib.Path:
  """``make(root / name)`` once per session, whichever worker asks first; the others wait for it."""
  directory = root / name
  with _locked(root / f'{name}.lock'):
    if not (root / f'{name}.done').exists():
      shutil.rmtree(directory, ignore_errors=True)
      make(directory)
      (root / f'{name}.done').touch()
  return directory


def _listing(directory: pathlib.Path):
  return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob('*'))


@pytest.fixture(scope='session')
def session_dir(request) -> pathlib.Path:
  """The session's directory, shared by the xdist workers."""
  return request.config.dessilbi_root


@pytest.fixture(scope='session')
def prepare_data(session_dir):
  """``prepare_data(name)``: the shared data directory (``$DESSILBI_DATA_DIR``) with ``name`` prepared."""
  from dessilbi_jax import data   # pylint: disable=g-import-not-at-top

  def prepare(name: str) -> str:
    directory = os.environ['DESSILBI_DATA_DIR']
    with _locked(session_dir / 'data.lock'):
      data.load_arrays(name, 'train', data_dir=directory)
    return directory

  return prepare


@pytest.fixture(scope='session')
def data_dir(prepare_data) -> str:
  """The session's data directory with digits prepared (read it; copy it to damage it)."""
  return prepare_data('digits')


@pytest.fixture(scope='session')
def tiny(data_dir):
  """A small LeNet on digits: 2 epochs of 11 steps."""
  from dessilbi_jax import train   # pylint: disable=g-import-not-at-top
  return train.TrainConfig(**TINY, data_dir=data_dir)


@pytest.fixture(scope='session')
def lenet_run(tiny, session_dir):
  """The 2-epoch run of ``tiny``, trained once per session: READ-ONLY (copy it with ``copy_run``)."""
  from dessilbi_jax import train   # pylint: disable=g-import-not-at-top
  directory = _once(session_dir, 'lenet_run', lambda d: train.fit(tiny, d, quiet=True))
  before = _listing(directory)
  yield directory
  assert _listing(directory) == before, f'a test changed the shared run {directory}: copy it with copy_run'


@pytest.fixture
def copy_run(lenet_run, tmp_path):
  """``copy_run(name='run')``: a fresh copy of ``lenet_run`` in the test's temporary directory."""
  def copy(name: str = 'run', to: pathlib.Path | None = None) -> pathlib.Path:
    out = (to or tmp_path) / name
    shutil.copytree(lenet_run, out)
    return out
  return copy


@pytest.fixture(scope='session')
def run(lenet_run, tiny, tmp_path_factory):
  """``(directory, TrainResult)`` of the 2-epoch run: a copy for this worker, its result read by resuming it
  (nothing left to train: the checkpoint's bits). Tests copy the directory before changing it."""
  from dessilbi_jax import train   # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp('run') / 'run'
  shutil.copytree(lenet_run, out)
  return out, train.fit(tiny, out, resume=True, quiet=True)


@pytest.fixture(scope='module')
def rbg_keys():
  """'rbg' PRNG keys for a module: threefry takes ~9 s to compile ResNet-20's init on a 2-core CPU, 'rbg' ~2 s."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', previous)
