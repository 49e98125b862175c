"""Two processes on localhost (JAX's CPU collectives): the same training as one process, one writer."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dessilbi_jax.train import checkpoint
from dessilbi_jax.core import grouping
from dessilbi_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ['--widths', '4', '8', '16', '16', '--batch-size', '128', '--lr', '0.05', '--quiet']

# One process of `dessilbi train --distributed ...`; it saves the params it ends with beside the run. With
# $LATE_UNTIL, process 1 reaches the run directory only once that file exists (a process that starts late).
_PROCESS = textwrap.dedent("""
    import os, pathlib, sys, time, numpy as np, jax
    from dessilbi_jax import cli, train
    from dessilbi_jax.core import grouping
    real_fit, results = train.fit, []
    def fit(*args, **kwargs):
      late = os.environ.get('LATE_UNTIL')
      while late and jax.process_index() == 1 and not pathlib.Path(late).exists():
        time.sleep(0.02)
      results.append(real_fit(*args, **kwargs))
      return results[-1]
    train.fit = fit
    status = cli.main(sys.argv[2:])
    if results:
      flat = jax.tree_util.tree_flatten_with_path(results[-1].params)[0]
      np.savez(f'{sys.argv[1]}-{jax.process_index()}.npz', **{grouping.path_str(p): x for p, x in flat})
    sys.exit(status)
    """)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(argv, dump, *, late_until: pathlib.Path = None, timeout=150):
  """Runs ``dessilbi train --distributed`` as processes 0 and 1; process 1 goes on once ``late_until`` exists."""
  port = _free_port()
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'LATE_UNTIL': str(late_until or '')}
  env.pop('XLA_FLAGS', None)
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, '-c', _PROCESS, str(dump), 'train', *argv, '--distributed', '--coordinator-address',
           f'localhost:{port}', '--num-processes', '2', '--process-id', str(i)],
          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [np.load(f'{dump}-{i}.npz') for i in range(2)]


@pytest.fixture(scope='module')
def single(run, tiny):
  """The same run in one process (one device, the same global batch of 128): 2 epochs, checkpoints 1 and 2
  (conftest.py's run)."""
  assert tiny == train.preset('digits', widths=(4, 8, 16, 16), batch_size=128, lr=0.05, epochs=2,
                              data_dir=tiny.data_dir)
  out, result = run
  return tiny.data_dir, out, result


def _params_of_checkpoint(run_dir, epoch, like):
  state, _ = checkpoint.restore(run_dir / 'checkpoints', like, epoch=epoch)
  return {grouping.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}


@pytest.mark.slow   # four processes
def test_two_processes_train_like_one_and_only_process_0_writes(single, tmp_path):
  data_dir, single_dir, result = single
  out = tmp_path / 'run'
  # Process 1 reaches the directory only once process 0 has created it and taken its lock: it must not take
  # it for another run's.
  params = _two_processes([*FLAGS, '--epochs', '1', '--data-dir', data_dir, '--out', str(out)], tmp_path / 'p',
                          late_until=out / '.lock')
  assert sorted(params[0].files) == sorted(params[1].files)
  for name in params[0].files:
    np.testing.assert_array_equal(params[0][name], params[1][name])   # both processes hold the same bits
  expected = _params_of_checkpoint(single_dir, 1, result.state)
  for name, w in expected.items():
    np.testing.assert_allclose(params[0][name], w, rtol=1e-4, atol=1e-5)
  # One writer: one line per epoch, the files of one run, no lock left behind.
  assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [1]
  assert sorted(p.name for p in out.iterdir()) == ['checkpoints', 'config.json', 'init_params', 'metrics.jsonl',
                                                   'path.npz', 'plots']

  # Resume across processes, to epoch 2: the single process's epoch 2.
  params = _two_processes(['--resume', '--epochs', '2', '--quiet', '--out', str(out)], tmp_path / 'q')
  expected = _params_of_checkpoint(single_dir, 2, result.state)
  for name, w in expected.items():
    np.testing.assert_array_equal(params[0][name], params[1][name])
    np.testing.assert_allclose(params[0][name], w, rtol=1e-4, atol=1e-5)
  assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [1, 2]


def test_distributed_flags_without_distributed_are_an_error(capsys):
  from dessilbi_jax import cli
  assert cli.main(['train', '--num-processes', '2']) == 1
  assert 'go with --distributed' in capsys.readouterr().err
