"""Faults a run must survive with one clear line and nothing of the user's lost: deleted checkpoints, another run's
checkpoint, read-only and full disks, Ctrl-C / SIGTERM / SIGKILL, flags that mean nothing, damaged data and runs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from dessilbi_jax import cli
from dessilbi_jax import train
from dessilbi_jax.train import checkpoint
from dessilbi_jax.train import regularization_path

# The tiny 2-epoch run: tests/conftest.py's session fixtures `tiny` and `run`, copied per test by `copy`.
from test_run_files import TINY  # pylint: disable=g-bad-import-order
from test_run_files import TINY_FLAGS
from test_run_files import copy  # noqa: F401  (fixtures)


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  """Every file under ``directory`` (relative path -> bytes) and every directory (-> None)."""
  return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob('*'))}


def assert_kept(before: dict[str, bytes], directory: pathlib.Path) -> None:
  """Everything in ``before`` is still in ``directory``, with the same bytes."""
  now = snapshot(directory)
  lost = [name for name in before if name not in now]
  changed = [name for name in before if name in now and now[name] != before[name]]
  assert not lost and not changed, (lost, changed)


def assert_one_error_line(err: str, *needles: str, lines: int = 1) -> None:
  text = err.strip()
  assert 'Traceback' not in text, text
  assert 1 <= len(text.splitlines()) <= lines, text
  for needle in needles:
    assert needle in text, (needle, text)


def _assert_trees_equal(a, b):
  equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree.leaves(equal)), equal


# 1. A resume never deletes the user's files

def test_a_resume_without_checkpoints_refuses_and_changes_nothing(copy, capsys):
  shutil.rmtree(copy / 'checkpoints')
  (copy / 'NOTES.txt').write_text('my notes')
  (copy / 'ticket-epoch2-rewind').mkdir()
  (copy / 'ticket-epoch2-rewind' / 'ticket.json').write_text('{}')
  before = snapshot(copy)
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet']) == 1
  assert_one_error_line(capsys.readouterr().err, f'{copy / "checkpoints"} is missing', 'nothing was changed',
                        f'dessilbi train --resume --out {copy}', 'metrics.jsonl')
  assert snapshot(copy) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again_keeping_every_file(copy, run, capsys):
  shutil.rmtree(copy / 'checkpoints')   # (fit draws no plots: the command does, after it)
  for name in ('metrics.jsonl', 'path.npz'):
    (copy / name).unlink()
  (copy / 'NOTES.txt').write_text('my notes')
  before = snapshot(copy)
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet']) == 0
  assert 'training it from epoch 1 (its files are kept)' in capsys.readouterr().out   # said under --quiet
  assert_kept(before, copy)   # init_params too: the same seed's, not rewritten
  state, _ = checkpoint.restore(copy / 'checkpoints', run[1].state)
  _assert_trees_equal(state.params, run[1].params)


def test_a_failure_before_the_first_checkpoint_removes_only_what_the_run_wrote(tiny, tmp_path):
  out = tmp_path / 'run'

  def user_writes_then_fails(epoch):
    (out / 'NOTES.txt').write_text('written by the user during the run')
    raise ValueError('an extension failed')

  with pytest.raises(ValueError, match='an extension failed'):
    train.fit(tiny, out, quiet=True, extensions=[train.Extension('user', metrics=user_writes_then_fails)])
  assert snapshot(out) == {'NOTES.txt': b'written by the user during the run'}


# 2. A checkpoint of another run

def test_a_checkpoint_of_another_network_is_refused_in_one_line(copy, capsys):
  config = json.loads((copy / 'config.json').read_text())
  config['widths'] = [6, 16, 120, 84]   # the directory's config says another network than its checkpoints
  (copy / 'config.json').write_text(json.dumps(config))
  before = snapshot(copy)
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet']) == 1
  assert_one_error_line(capsys.readouterr().err, 'belongs to another run', 'widths 4 8 16 16 there',
                        '6 16 120 84 in config.json')
  assert snapshot(copy) == before


def test_a_checkpoint_of_another_model_is_one_line_without_arrays(run, tiny):
  other = train.fit(train.TrainConfig(**{**TINY, 'widths': (3, 8, 16, 16), 'epochs': 1}, data_dir=tiny.data_dir),
                    quiet=True)   # no directory: only its state
  with pytest.raises(checkpoint.CheckpointError) as caught:
    checkpoint.restore(run[0] / 'checkpoints', other.state)
  message = str(caught.value)
  assert '\n' not in message and len(message) < 400 and 'does not match this run' in message, message
  assert 'Conv_0' in message


# 3. OS errors: a read-only --out, a full disk during a save

def _read_only_dir(path: pathlib.Path):
  """A read-only directory: chmod for a user, a read-only tmpfs for root (skipped if neither is possible)."""
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o555)
    return lambda: path.chmod(0o755)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(path)],
                    capture_output=True).returncode:
    pytest.skip('root, and cannot mount a read-only tmpfs')
  return lambda: subprocess.run(['umount', str(path)], check=True)


def test_a_read_only_out_is_one_line_naming_it(tiny, tmp_path, capsys):
  undo = _read_only_dir(tmp_path / 'ro')
  try:
    out = tmp_path / 'ro' / 'run'
    assert cli.main(['train', *TINY_FLAGS, '--epochs', '1', '--data-dir', tiny.data_dir, '--out', str(out)]) == 1
    assert_one_error_line(capsys.readouterr().err, f'Cannot write the run into --out {out}', 'Choose a directory')
  finally:
    undo()


def _full_disk_in(monkeypatch, marker: str):
  """Tensorstore fails to write every array under ``marker`` as on a full disk (ENOSPC), as a real one does."""
  import tensorstore as ts
  real_open = ts.open
  hit = []

  def open_(spec, *args, **kwargs):
    if marker in json.dumps(spec.to_json() if hasattr(spec, 'to_json') else spec, default=str):
      hit.append(True)
      promise, future = ts.Promise.new()
      promise.set_exception(ValueError('RESOURCE_EXHAUSTED: Error writing local file: No space left on device '
                                       "[os_error_code='28']"))
      return future
    return real_open(spec, *args, **kwargs)

  monkeypatch.setattr(ts, 'open', open_)
  return hit


def test_a_full_disk_during_a_save_stops_there_and_the_resume_is_bit_identical(tiny, run, tmp_path, monkeypatch,
                                                                               capsys):
  out = tmp_path / 'run'
  hit = _full_disk_in(monkeypatch, '2.orbax-checkpoint-tmp')
  assert cli.main(['train', *TINY_FLAGS, '--epochs', '3', '--quiet', '--data-dir', tiny.data_dir,
                   '--out', str(out)]) == 1
  assert hit
  err = capsys.readouterr().err
  assert_one_error_line(err, f'{out / "checkpoints" / "2"} failed: No space left on device',
                        'the last good checkpoint is that of epoch 1', f'dessilbi train --resume --out {out}', lines=2)
  assert checkpoint.saved_epochs(out / 'checkpoints') == [1]   # stopped at the failed save, not an epoch later
  assert not list(out.rglob('*orbax-checkpoint-tmp*')) and not list(out.rglob('*.tmp*'))
  monkeypatch.undo()   # space freed
  resumed = train.fit(tiny, out, resume=True, quiet=True)
  _assert_trees_equal(resumed.state, run[1].state)


def test_a_full_disk_while_writing_the_path_keeps_the_old_file(tmp_path, monkeypatch):
  path = regularization_path.RegularizationPath()
  path.epochs, path.steps = [1], [11]
  file = tmp_path / 'path.npz'
  path.save(file, 11)
  before = file.read_bytes()

  def savez_until_full(target, **arrays):
    pathlib.Path(target).write_bytes(b'PK\x03\x04 half')
    raise OSError(28, 'No space left on device', str(target))

  monkeypatch.setattr(np, 'savez_compressed', savez_until_full)
  path.epochs, path.steps = [1, 2], [11, 22]
  with pytest.raises(OSError, match='No space left'):
    path.save(file, 11)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['path.npz'] and file.read_bytes() == before


# 4. and 8. Signals: Ctrl-C and SIGTERM say what was kept; SIGKILL mid-epoch resumes bit-identically

# Runs `dessilbi train`, pausing where the test wants its signal: at step 3 of epoch 2 (plain training steps) or
# inside the save of epoch 2 (the write in flight). It writes READY when there.
_PAUSED_RUN = textwrap.dedent('''
    import pathlib, sys, time
    from dessilbi_jax import cli
    from dessilbi_jax.train import checkpoint, steps
    ready, where = pathlib.Path(sys.argv[1]), sys.argv[2]
    if where == 'step':
      make = steps.make_train_step
      def make_train_step(*args, **kwargs):
        step, count = make(*args, **kwargs), [0]
        def paused(*a, **k):
          count[0] += 1
          if count[0] == 14:   # epoch 2 (11 steps an epoch), step 3
            ready.write_text('step'); time.sleep(60)
          return step(*a, **k)
        return paused
      steps.make_train_step = make_train_step
    else:
      save = checkpoint.ocp.CheckpointManager.save
      def paused_save(self, epoch, *a, **k):
        result = save(self, epoch, *a, **k)
        if epoch == 2:
          ready.write_text('save'); time.sleep(60)
        return result
      checkpoint.ocp.CheckpointManager.save = paused_save
    sys.exit(cli.main(sys.argv[3:]))
''')


def _paused_run(tmp_path, tiny, where: str, epochs: int = 3):
  ready, out = tmp_path / 'READY', tmp_path / 'run'
  process = subprocess.Popen(
      [sys.executable, '-c', _PAUSED_RUN, str(ready), where, 'train', *TINY_FLAGS, '--epochs', str(epochs),
       '--quiet', '--data-dir', tiny.data_dir, '--out', str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 400   # a loaded 2-core machine: start-up and compilation are slow
  while not ready.exists():
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f'the run did not reach its pause: {process.communicate()}')
    time.sleep(0.05)
  return process, out


@pytest.mark.parametrize('where, signum, status', [
    ('step', signal.SIGINT, 130),
    # Known bug, open: once in two clean-clone CI runs, SIGTERM in the pause after a save left the process
    # alive past the 60 s wait (a hang on exit, not reproduced alone). Not strict until it is found.
    pytest.param('save', signal.SIGTERM, 143, marks=pytest.mark.xfail(
        raises=subprocess.TimeoutExpired, strict=False, reason='rare hang on exit after SIGTERM during a save')),
])
def test_an_interrupt_says_what_was_kept_and_how_to_continue(where, signum, status, tiny, run, tmp_path):
  process, out = _paused_run(tmp_path, tiny, where)
  process.send_signal(signum)
  try:
    _, err = process.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    raise
  assert process.returncode == status, err
  kept = 1 if where == 'step' else 2   # a save in flight is finished, never left half-written
  assert_one_error_line(err, f'Interrupted ({signal.Signals(signum).name}) in epoch 2',
                        f'the last checkpoint is that of epoch {kept}', f'dessilbi train --resume --out {out}', lines=2)
  assert checkpoint.saved_epochs(out / 'checkpoints') == list(range(1, kept + 1))
  assert not list(out.rglob('*orbax-checkpoint-tmp*')) and not (out / '.lock').exists()
  state, _ = checkpoint.restore(out / 'checkpoints', run[1].state, epoch=1)   # whole and verified


def test_a_kill_during_training_steps_resumes_bit_identically(tiny, run, tmp_path):
  process, out = _paused_run(tmp_path, tiny, 'step')
  process.kill()   # SIGKILL: no handler runs, the lock stays behind
  process.communicate(timeout=60)
  assert checkpoint.saved_epochs(out / 'checkpoints') == [1] and (out / '.lock').exists()
  resumed = train.fit(tiny, out, resume=True, quiet=True)   # the same config, --epochs 2
  _assert_trees_equal(resumed.state, run[1].state)
  assert [row['epoch'] for row in resumed.history] == [1, 2]


# 5. Flags that mean nothing

@pytest.mark.parametrize('argv, message', [
    (['train', '--widths'], '--widths needs at least one width'),
    (['grow', '--start-widths'], '--start-widths needs at least one width'),
    (['train', '--fall-back'], '--fall-back goes with --resume'),
    (['train', '--seed', '18446744073709551616'], '--seed: must be in [0, 9223372036854775807]'),
    (['grow', '--resume', '--out', 'x', '--tau', '0.5'], '--tau cannot change on --resume'),
    (['grow', '--resume', '--out', 'x', '--reset-state'], '--reset-state cannot change on --resume'),
])
def test_flags_that_would_mean_nothing_are_one_line_naming_them(argv, message, tiny, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main([*argv, '--data-dir', tiny.data_dir]) == 1
  assert_one_error_line(capsys.readouterr().err, message)
  assert list(tmp_path.iterdir()) == []


# 8. Damaged checkpoints, damaged and missing runs, damaged and read-only data directories

def _flip_a_checked_bit(directory: pathlib.Path, template) -> None:
  """Flips one bit of the checkpoint of epoch 2 that its checksums catch (orbax alone reads most flips)."""
  for file in sorted(p for p in (directory / '2' / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'):
    original = file.read_bytes()
    for fraction in (0.5, 0.75, 0.25):
      damaged = bytearray(original)
      damaged[int(len(original) * fraction)] ^= 0x10
      file.write_bytes(bytes(damaged))
      try:
        checkpoint.restore(directory, template, epoch=2)
      except checkpoint.CheckpointError as e:
        if 'is damaged: the checksum of' in str(e):
          return
      file.write_bytes(original)
  pytest.fail('no flipped bit was caught')


def test_a_bit_flipped_checkpoint_with_and_without_fall_back(copy, run, capsys):
  _flip_a_checked_bit(copy / 'checkpoints', run[1].state)
  before = snapshot(copy)
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet']) == 1
  assert_one_error_line(capsys.readouterr().err, 'The checkpoint of epoch 2', 'is damaged', '--fall-back')
  assert snapshot(copy) == before
  assert cli.main(['train', '--resume', '--out', str(copy), '--quiet', '--fall-back']) == 0
  aside, = (copy / 'damaged').iterdir()   # the damaged checkpoint, moved whole, not deleted
  assert snapshot(aside) == {k[len('checkpoints/2/'):]: v for k, v in before.items() if k.startswith('checkpoints/2/')}
  assert_kept({k: v for k, v in before.items() if not k.startswith(('checkpoints/2', 'metrics', 'path', 'config',
                                                                     'plots'))}, copy)
  state, _ = checkpoint.restore(copy / 'checkpoints', run[1].state, epoch=2)   # epoch 2 trained again
  _assert_trees_equal(state, run[1].state)


@pytest.mark.parametrize('damage, message', [
    ('missing', 'is not a training run: it has no config.json'),
    ('no checkpoints', 'holds no checkpoint'),
    ('torn config', 'config.json is damaged and cannot be read'),
])
def test_compact_and_ticket_on_a_missing_or_half_written_run(damage, message, copy, tmp_path, capsys):
  target = copy
  if damage == 'missing':
    target = tmp_path / 'nothing-here'
  elif damage == 'no checkpoints':   # what a run killed in its first epoch leaves
    shutil.rmtree(copy / 'checkpoints')
    for name in ('metrics.jsonl', 'path.npz'):
      (copy / name).unlink()
  else:
    (copy / 'config.json').write_text((copy / 'config.json').read_text()[:40])
  before = snapshot(copy)
  assert cli.main(['compact', '--run', str(target), '--out', str(tmp_path / 'small')]) == 1
  assert_one_error_line(capsys.readouterr().err, message if damage != 'no checkpoints' else f'--run {target} holds no '
                        'checkpoint')
  assert cli.main(['ticket', '--run', str(target), '--epoch', '1', '--quiet']) == 1
  assert_one_error_line(capsys.readouterr().err, message if damage != 'no checkpoints' else 'has no path.npz')
  assert snapshot(copy) == before and not (tmp_path / 'small').exists()


def test_a_truncated_data_file_is_named_with_the_fix(tiny, tmp_path, capsys):
  data_dir = tmp_path / 'data'
  shutil.copytree(tiny.data_dir, data_dir)
  test_file, = data_dir.rglob('*_digits-test.array_record*')   # the shared directory may hold other datasets
  test_file.write_bytes(test_file.read_bytes()[:test_file.stat().st_size // 2])
  assert cli.main(['train', *TINY_FLAGS, '--data-dir', str(data_dir), '--out', str(tmp_path / 'x')]) == 1
  assert_one_error_line(capsys.readouterr().err, 'are corrupt or incomplete', 'truncated', 'Delete that directory')
  assert not (tmp_path / 'x').exists()


def test_a_read_only_data_directory_that_is_not_prepared_is_named(tmp_path, capsys):
  undo = _read_only_dir(tmp_path / 'ro')
  try:
    assert cli.main(['train', *TINY_FLAGS, '--data-dir', str(tmp_path / 'ro'), '--out', str(tmp_path / 'x')]) == 1
    # The line that says preparation starts (stdout or stderr, by tfds' logging), then the error.
    assert_one_error_line(capsys.readouterr().err, f'Cannot prepare digits in the data directory {tmp_path / "ro"}',
                          'Read-only file system', '--data-dir', lines=2)
  finally:
    undo()
  assert not (tmp_path / 'x').exists()
