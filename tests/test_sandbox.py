"""The suite's sandbox (conftest.py): tests read and write only the session's temporary directory."""

import os
import pathlib
import subprocess
import sys

from dessilbi_jax.data import datasets


def test_the_default_data_directory_is_the_sessions(session_dir):
  default = pathlib.Path(datasets.resolve_data_dir(None))
  assert default == session_dir / 'data' and pathlib.Path(os.path.expanduser('~')) == session_dir / 'home'
  # Subprocesses inherit it (and the shared compilation cache).
  out = subprocess.run([sys.executable, '-c', 'import os; print(os.path.expanduser("~"), os.environ["DESSILBI_DATA_DIR"], '
                        'os.environ["MPLCONFIGDIR"], os.environ["JAX_COMPILATION_CACHE_DIR"])'],
                       capture_output=True, text=True, check=True).stdout.split()
  assert all(pathlib.Path(p).is_relative_to(session_dir) for p in out), out


def test_the_shared_run_is_the_tiny_config_trained_two_epochs(lenet_run, tiny, run):
  from dessilbi_jax import train   # pylint: disable=g-import-not-at-top
  assert train.load_config(lenet_run) == tiny
  assert [h['epoch'] for h in run[1].history] == [1, 2] and run[1].resumed_from == 2
