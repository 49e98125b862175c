"""Run files that survive damage: torn metrics, flipped bits, a broken path.npz, locks, bad values."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dessilbi_jax.train import checkpoint
from dessilbi_jax import cli
from dessilbi_jax import train

TINY = dict(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=2, lr=0.05)
TINY_FLAGS = ['--widths', '4', '8', '16', '16', '--batch-size', '128', '--lr', '0.05']


# tiny (TrainConfig(**TINY)) and run (its 2-epoch run and result): tests/conftest.py.


@pytest.fixture
def copy(run, tmp_path):
  out = tmp_path / 'copy'
  shutil.copytree(run[0], out)
  return out


def _assert_trees_equal(a, b):
  equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree.leaves(equal)), equal


def _listing(directory: pathlib.Path):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob('*'))


# metrics.jsonl

def test_a_torn_line_after_the_last_checkpoint_is_dropped_on_resume(copy, tiny, run):
  shutil.rmtree(copy / 'checkpoints' / '2')   # the run died after writing epoch 2's row, before its checkpoint
  with open(copy / 'metrics.jsonl', 'a') as f:
    f.write('{"epoch": 3, "step": 33, "train_loss": 0.5, "per_leaf": {"Conv_0/ker')   # the disk filled
  resumed = train.fit(tiny, copy, resume=True, quiet=True)
  _assert_trees_equal(resumed.params, run[1].params)
  rows = [json.loads(line) for line in (copy / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in rows] == [1, 2]


def test_a_damaged_row_before_the_checkpoint_names_file_and_line(copy, tiny):
  lines = (copy / 'metrics.jsonl').read_text().splitlines()
  (copy / 'metrics.jsonl').write_text(lines[0][:50] + '\n' + lines[1] + '\n')
  with pytest.raises(train.DamagedFileError, match=r'metrics.jsonl, line 1, is damaged'):
    train.fit(tiny, copy, resume=True, quiet=True)


def test_ticket_reads_a_run_with_a_torn_last_line(copy, capsys):
  with open(copy / 'metrics.jsonl', 'a') as f:
    f.write('{"epoch": 3, "st')
  assert cli.main(['ticket', '--run', str(copy), '--epoch', '1', '--epochs', '1', '--quiet']) == 0
  report = json.loads((copy / 'ticket-epoch1-rewind' / 'ticket.json').read_text())
  assert report['run_dense_test_acc'] == json.loads((copy / 'metrics.jsonl').read_text().splitlines()[0])['dense_test_acc']


# Checkpoints

def test_flipped_bits_in_a_checkpoint_are_caught_by_its_checksums(copy, run):
  directory = copy / 'checkpoints'
  files = sorted(p for p in (directory / '2' / 'state').rglob('*') if p.is_file() and p.parent.name == 'd')
  messages = []
  for file in files:   # orbax's data files (some are index nodes it no longer reads)
    original = file.read_bytes()
    for fraction in (0.25, 0.5, 0.75):
      damaged = bytearray(original)
      damaged[int(len(original) * fraction)] ^= 0x10   # one bit
      file.write_bytes(bytes(damaged))
      try:
        state, _ = checkpoint.restore(directory, run[1].state, epoch=2)
      except checkpoint.CheckpointError as e:
        assert 'The checkpoint of epoch 2 in' in str(e)
        messages.append(str(e))
      else:   # a byte that is not read: the state must be the saved one, to the bit
        _assert_trees_equal(state, run[1].state)
      file.write_bytes(original)
  # Orbax reads most such flips without complaint (it checks only its index): the checksums name the damage.
  assert any('is damaged: the checksum of' in m for m in messages), messages


def test_a_damaged_checkpoint_falls_back_only_when_asked(copy, tiny, run, capsys):
  (copy / 'checkpoints' / '2' / 'record' / 'metadata').write_text(
      (copy / 'checkpoints' / '2' / 'record' / 'metadata').read_text().replace('"sha256": {".step": "', '"sha256": {".step": "0'))
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet']) == 1
  err = capsys.readouterr().err
  assert 'The checkpoint of epoch 2' in err and 'is damaged' in err and '--fall-back' in err
  assert cli.main(['train', '--resume', '--out', str(copy), '--fall-back']) == 0
  out = capsys.readouterr().out
  assert 'Skipping the checkpoint of epoch 2' in out and 'Using the checkpoint of epoch 1' in out
  assert 'Resuming' in out and 'from the checkpoint of epoch 1' in out
  resumed, _ = checkpoint.restore(copy / 'checkpoints', run[1].state, epoch=2)   # epoch 2 trained again
  _assert_trees_equal(resumed.params, run[1].params)


# path.npz

def test_a_damaged_path_npz_is_named_and_rebuilt_on_resume(copy, tiny, run, capsys):
  good = train.load_path(run[0])
  (copy / 'path.npz').write_bytes(b'PK\x03\x04 not a zip any more')
  assert cli.main(['ticket', '--run', str(copy), '--epoch', '1']) == 1
  err = capsys.readouterr().err
  assert f'{copy / "path.npz"} (the regularization path) is damaged' in err and '--resume' in err
  train.fit(tiny, copy, resume=True)
  assert 'was damaged: rebuilt from the checkpoint of epoch 2' in capsys.readouterr().out
  rebuilt = train.load_path(copy)
  assert sorted(rebuilt) == sorted(good)
  for key in good:
    np.testing.assert_array_equal(rebuilt[key], good[key])


# Bad values, before any work and in the flags' terms

@pytest.mark.parametrize('flags, message', [
    (['--keep-checkpoints', '0'], '--keep-checkpoints: must be in [1, inf), got 0'),
    (['--keep-checkpoints', '-1'], '--keep-checkpoints: must be in [1, inf), got -1'),
    (['--batch-size', '0'], '--batch-size: must be in [1, inf), got 0'),
    (['--sparsity', '1.5', '--optimizer', 'gmp'], '--sparsity: must be in [0, 1), got 1.5'),
    (['--lambda', 'filter=-1'], '--lambda: must be finite numbers >= 0, got -1.0 for filter'),
    (['--mu', 'nan'], '--mu: must be finite, got nan'),
])
def test_bad_values_are_errors_in_flag_terms_before_anything_is_written(flags, message, tiny, tmp_path, capsys):
  assert cli.main(['train', *flags, '--data-dir', tiny.data_dir, '--out', str(tmp_path / 'x')]) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_bad_values_of_the_api_name_the_field():
  with pytest.raises(train.ConfigError, match=r"kappa: must be a number, got '1' \(str\)"):
    train.check_config(train.TrainConfig(kappa='1'))
  with pytest.raises(train.ConfigError, match=r'epochs: must be an integer, got 2.5'):
    train.check_config(train.TrainConfig(epochs=2.5))


def test_a_lambda_for_one_kind_keeps_the_presets_for_the_others(tiny, tmp_path):
  out = tmp_path / 'run'
  assert cli.main(['train', *TINY_FLAGS, '--epochs', '1', '--lambda', 'filter=1', '--quiet',
                   '--data-dir', tiny.data_dir, '--out', str(out)]) == 0
  assert train.load_config(out).lambdas == (('filter', 1.0), ('lasso', 0.2))   # digits' preset: 0.2


def test_bad_ticket_and_resume_values(run, copy, capsys):
  for flags, message in ((['--epochs', '0'], '--epochs must be a positive number'),
                         (['--lr', '0'], '--lr must be a positive number')):
    assert cli.main(['ticket', '--run', str(run[0]), '--epoch', '1', *flags]) == 1
    assert message in capsys.readouterr().err
  before = (copy / 'config.json').read_text()
  assert cli.main(['train', '--resume', '--out', str(copy), '--epochs', '1']) == 1
  assert '--epochs 1 is below the 2 epochs the run' in capsys.readouterr().err
  assert (copy / 'config.json').read_text() == before
  assert not (run[0] / 'ticket-epoch1-rewind').exists()


# The directory: locks, failures before the first checkpoint, remote paths

def test_a_second_run_into_a_locked_directory_names_the_holder(tiny, tmp_path):
  out = tmp_path / 'run'
  out.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    (out / '.lock').write_text(json.dumps({'pid': holder.pid, 'host': os.uname().nodename, 'since': 'now'}))
    with pytest.raises(train.RunLockedError, match=rf'in use by another run: process {holder.pid} on'):
      train.fit(tiny, out, quiet=True)
    assert _listing(out) == ['.lock']
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing its lock: the lock is stale and taken over.
  result = train.fit(dataclasses.replace(tiny, epochs=1), out, quiet=True)
  assert [h['epoch'] for h in result.history] == [1] and not (out / '.lock').exists()


def test_a_run_failing_before_its_first_checkpoint_leaves_the_directory_as_found(tiny, tmp_path, capsys):
  new = tmp_path / 'new'
  assert cli.main(['train', *TINY_FLAGS[:-2], '--lr', '1e9', '--epochs', '1', '--data-dir', tiny.data_dir,
                   '--out', str(new)]) == 1
  assert 'The training loss is' in capsys.readouterr().err
  assert not new.exists()
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert cli.main(['train', *TINY_FLAGS[:-2], '--lr', '1e9', '--epochs', '1', '--data-dir', tiny.data_dir,
                   '--out', str(empty)]) == 1
  assert empty.is_dir() and _listing(empty) == []


def test_a_missing_test_split_fails_before_anything_is_written(tiny, tmp_path, capsys):
  data_dir = tmp_path / 'data'
  shutil.copytree(tiny.data_dir, data_dir)
  for file in data_dir.rglob('*test.array_record*'):
    file.unlink()
  assert cli.main(['train', *TINY_FLAGS, '--data-dir', str(data_dir), '--out', str(tmp_path / 'x')]) == 1
  assert 'test' in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_a_run_killed_in_its_first_epoch_restarts_on_resume(run, copy, tiny):
  # What a kill -9 in epoch 1 leaves: the config, the initial params, a stale lock, no checkpoint.
  shutil.rmtree(copy / 'checkpoints')   # (fit draws no plots: nothing else to remove)
  for name in ('metrics.jsonl', 'path.npz'):
    (copy / name).unlink()
  (copy / '.lock').write_text(json.dumps({'pid': 2 ** 22 + 12345, 'host': os.uname().nodename, 'since': 'then'}))
  with pytest.raises(FileExistsError, match='pass --resume'):
    train.fit(tiny, copy, quiet=True)
  resumed = train.fit(tiny, copy, resume=True, quiet=True)
  _assert_trees_equal(resumed.params, run[1].params)
  assert [h['epoch'] for h in resumed.history] == [1, 2]


def test_remote_paths_are_refused_and_nothing_is_written_elsewhere(tiny, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main(['train', *TINY_FLAGS, '--data-dir', tiny.data_dir, '--out', 'gs://bucket/run']) == 1
  assert '--out gs://bucket/run is a remote path' in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(ValueError, match='remote path'):
    train.fit(tiny, 's3://bucket/run', quiet=True)


def test_old_config_json_with_lambda_underscore_is_read(tmp_path):
  values = {**train.TrainConfig().to_json()}
  values.update(values.pop('opt'))    # the flat config.json of before the optimizer registry
  values['lambda_'] = values.pop('lambdas')
  (tmp_path / 'config.json').write_text(json.dumps(values))
  assert train.load_config(tmp_path) == train.TrainConfig()
