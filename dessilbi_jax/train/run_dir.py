"""The run directory: its config, metrics, path, plots, lock, and what happens when files are damaged.

::

  DIR/config.json        the TrainConfig
  DIR/init_params/       the params at step 0 (for rewinding tickets)
  DIR/metrics.jsonl      one JSON object per epoch
  DIR/path.npz           the regularization path (regularization_path.py)
  DIR/plots/*.png        accuracy, support per layer, entry steps
  DIR/checkpoints/<E>/   the whole training state after epoch E (the last few), with the path
  DIR/.lock              held by the process writing the run (pid, host)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from dessilbi_jax.train import plots
from dessilbi_jax.train.config import TrainConfig
from dessilbi_jax.train.regularization_path import DamagedFileError
from dessilbi_jax.train.regularization_path import read_npz

LOCK = '.lock'
# The names a run writes at the top of its directory (growth.json: a growth run's settings; ticket.json: a
# ticket's report). Only these are ever removed, and only by the run that created them.
RUN_FILES = ('config.json', 'init_params', 'metrics.jsonl', 'path.npz', 'plots', 'checkpoints', 'growth.json',
             'ticket.json')
RESUMABLE_CHANGES = ('epochs', 'data_dir', 'keep_checkpoints')
_REMOTE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


class RunLockedError(FileExistsError):
  """Another live process writes the run directory."""


class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT (Ctrl-C) or SIGTERM; the message says what was kept and how to continue.

  A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it;
  ``exit_status`` is the shell's ``128 + signal`` (130, 143).
  """

  def __init__(self, message: str = '', signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
  """In the block, SIGTERM raises :class:`Interrupted` as Ctrl-C raises ``KeyboardInterrupt``.

  Only on the main thread and when SIGTERM has its default action (a
  program's own handler is left alone).
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def handler(signum, frame):
    raise Interrupted(signum=signum)

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def os_error_line(error: OSError) -> str:
  """An OS error in one line: what failed, on which path (``Permission denied: /runs/x/.lock``)."""
  if error.strerror is None:
    return str(error)   # raised by this package with a whole sentence
  where = ' -> '.join(str(f) for f in (error.filename, error.filename2) if f is not None)
  return f'{error.strerror}: {where}' if where else error.strerror


def record_config(cfg: TrainConfig) -> dict[str, Any]:
  """What a checkpoint records of the run's config (JSON), to be checked against config.json on resume."""
  return json.loads(json.dumps(cfg.to_json()))


def check_record(record: dict[str, Any], cfg: TrainConfig, name: str, run_dir: pathlib.Path) -> None:
  """A checkpoint's recorded config must be ``cfg`` (but for :data:`RESUMABLE_CHANGES`): it may be another run's."""
  saved = record.get('config')
  if saved is None:   # written before checkpoints recorded their config: its shapes are checked on restore
    return
  current = record_config(cfg)
  changed = [key for key in current if key in saved and key not in RESUMABLE_CHANGES and saved[key] != current[key]]
  if changed:
    diff = '; '.join(f'{key} {_shown(saved[key])} there, {_shown(current[key])} in config.json' for key in changed)
    raise ValueError(f'{name} belongs to another run: {diff}. Nothing was changed; resume the run it came from, '
                     f'or remove it from {run_dir / "checkpoints"}.')


def _shown(value) -> str:
  if isinstance(value, list):
    return ' '.join(map(str, value)) if all(isinstance(v, (int, float)) for v in value) else json.dumps(value)
  return repr(value)


def local_path(out_dir, flag: str = '--out') -> pathlib.Path:
  """``out_dir`` as a local path; a remote URL (``gs://``, ``s3://``) is refused, never written elsewhere."""
  text = os.fspath(out_dir)
  if _REMOTE.match(text):
    raise ValueError(f'{flag} {text} is a remote path; runs are written to a local filesystem only '
                     '(pathlib would turn it into a local directory named after the scheme). Write the run to '
                     'a local directory, or to a bucket mounted locally (gcsfuse), and copy it afterwards.')
  return pathlib.Path(text)


def load_config(run_dir) -> TrainConfig:
  """The TrainConfig saved in a run directory."""
  path = local_path(run_dir, '--run') / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{run_dir} is not a training run: it has no config.json.')
  try:
    return TrainConfig.from_json(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise DamagedFileError(f'{path} is damaged and cannot be read ({type(e).__name__}: {e}).') from e


def write_config(run_dir: pathlib.Path, cfg: TrainConfig) -> None:
  _write_atomic(run_dir / 'config.json', json.dumps(cfg.to_json(), indent=2) + '\n')


def load_path(run_dir) -> dict[str, np.ndarray]:
  """The arrays of ``path.npz`` in a run directory."""
  path = local_path(run_dir, '--run') / 'path.npz'
  if not path.is_file():
    raise FileNotFoundError(f'{run_dir} has no path.npz: the run recorded no epoch of a DessiLBI path.')
  try:
    return read_npz(path)
  except DamagedFileError as e:
    raise DamagedFileError(f'{e} `dessilbi train --resume --out {run_dir}` rebuilds it from the last '
                           'checkpoint.') from e


def read_history(run_dir: pathlib.Path, up_to: Optional[int] = None) -> list[dict[str, Any]]:
  """The rows of ``metrics.jsonl`` (epochs 1, 2, ...), up to epoch ``up_to`` if given.

  What follows epoch ``up_to`` is dropped whatever its state (written after
  the last checkpoint, e.g. a line torn when the disk filled). Without
  ``up_to``, a torn last line (no newline) is dropped. A damaged row before
  either is a :class:`DamagedFileError` naming the file and line.
  """
  file = run_dir / 'metrics.jsonl'
  if not file.is_file():
    if up_to:
      raise DamagedFileError(f'{file} is missing, although the run has a checkpoint of epoch {up_to}.')
    return []
  text = file.read_bytes().decode('utf-8', errors='replace')
  lines = text.split('\n')
  rows = []
  for number, line in enumerate(lines, start=1):
    if up_to is not None and len(rows) == up_to:
      break
    if not line.strip():
      continue
    torn = number == len(lines)  # the last line has no newline: a write cut short
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or row.get('epoch') != len(rows) + 1:
        raise ValueError(f'expected the row of epoch {len(rows) + 1}, got {str(row)[:80]}')
    except ValueError as e:
      if torn and up_to is None:
        break
      raise DamagedFileError(f'{file}, line {number}, is damaged ({e}); the rows up to the last checkpoint '
                             'must be whole. Restore the file from a copy, or start the run again.') from None
    rows.append(row)
  if up_to is not None and len(rows) < up_to:
    raise DamagedFileError(f'{file} holds {len(rows)} epoch(s), but the run has a checkpoint of epoch {up_to}.')
  return rows


def write_history(run_dir: pathlib.Path, history) -> None:
  _write_atomic(run_dir / 'metrics.jsonl', ''.join(json.dumps(h) + '\n' for h in history))


def append_history(run_dir: pathlib.Path, row) -> None:
  with open(run_dir / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps(row) + '\n')


def check_resumable(run_dir: pathlib.Path, cfg: TrainConfig) -> None:
  saved = load_config(run_dir)
  changed = [f.name for f in dataclasses.fields(cfg)
             if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]
  if changed:
    diff = ', '.join(f'{n}: {getattr(saved, n)!r} -> {getattr(cfg, n)!r}' for n in changed)
    raise ValueError(f'A resumed run keeps its configuration except {RESUMABLE_CHANGES}; changed: {diff}. '
                     'Start a new run (another --out) to change them.')


def check_new(run_dir: pathlib.Path) -> None:
  """A new run goes into a missing or empty directory."""
  if run_dir.exists() and not run_dir.is_dir():
    raise FileExistsError(f'{run_dir} exists and is not a directory; choose another --out.')
  if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
    holds_run = (run_dir / 'config.json').is_file()
    raise FileExistsError(f'{run_dir} already exists and is not empty; pass --resume to continue '
                          f'{"the run in it" if holds_run else "a run in it"}, or choose another --out. '
                          'Nothing was overwritten.')


@contextlib.contextmanager
def locked(run_dir: pathlib.Path) -> Iterator[None]:
  """Holds ``run_dir/.lock`` (created with O_EXCL) for the block; a stale lock of a dead process is taken over."""
  file = run_dir / LOCK
  me = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
  for _ in range(2):
    try:
      fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(file)
      if holder is not None and _alive(holder):
        raise RunLockedError(
            f'{run_dir} is in use by another run: process {holder.get("pid")} on {holder.get("host")} since '
            f'{holder.get("since")} holds {file}. Wait for it, or choose another --out. (If that process is '
            f'gone, delete {file}.)') from None
      file.unlink(missing_ok=True)  # a stale lock: its process died without releasing it
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    break
  else:
    raise RunLockedError(f'Could not take the lock {file}; another run keeps taking it.')
  try:
    yield
  finally:
    if _read_lock(file) == me:
      file.unlink(missing_ok=True)


def _read_lock(file: pathlib.Path) -> Optional[dict[str, Any]]:
  try:
    return json.loads(file.read_text())
  except (OSError, ValueError):
    return None   # half-written by a process that died: stale


def _alive(holder: dict[str, Any]) -> bool:
  if holder.get('host') != socket.gethostname():
    return True   # cannot tell: assume another host's process lives
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True
  return True


def created_names(run_dir: pathlib.Path, before: frozenset) -> list[pathlib.Path]:
  """The run's own files and directories in ``run_dir`` that were not there when it started (``before``).

  What a run removes when it fails before its first checkpoint: only the names
  a run writes (:data:`RUN_FILES`, their temporaries), never a user's file.
  """
  if not run_dir.is_dir():
    return []
  return sorted(p for p in run_dir.iterdir() if p.name not in before and _is_run_file(p.name))


def remove_created(run_dir: pathlib.Path, before: Optional[frozenset]) -> None:
  """Undoes a run that failed before its first checkpoint: removes what it created (``before=None``: the directory
  did not exist), and the directory itself if it created it and nothing else is left in it."""
  for p in created_names(run_dir, before or frozenset()):
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
  if before is None and run_dir.is_dir() and not any(run_dir.iterdir()):
    run_dir.rmdir()


def names_in(run_dir: pathlib.Path) -> Optional[frozenset]:
  """The names in ``run_dir`` now (``None``: it does not exist), for :func:`remove_created`."""
  return frozenset(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else None


def _is_run_file(name: str) -> bool:
  base = name[:-len('.tmp')] if name.endswith('.tmp') else name
  return base in RUN_FILES or name == LOCK or name.startswith('path.npz.tmp')


def check_restartable(run_dir: pathlib.Path) -> None:
  """A run with no checkpoint starts again from epoch 1 only if it recorded no epoch (nothing would be lost)."""
  rows = read_history(run_dir)
  recorded = [name for name, there in (('metrics.jsonl', bool(rows)), ('path.npz', (run_dir / 'path.npz').exists()),
                                       ('plots/', (run_dir / 'plots').exists())) if there]
  if recorded:
    gone = 'is missing' if not (run_dir / 'checkpoints').exists() else 'holds no complete checkpoint'
    raise FileNotFoundError(
        f'Nothing to resume from: {run_dir / "checkpoints"} {gone}, yet the run recorded '
        f'{len(rows)} epoch(s) ({", ".join(recorded)}), which training again would overwrite; nothing was changed. '
        f'To train it again from epoch 1 in place, move {" and ".join(recorded)} out of {run_dir} and run '
        f'`dessilbi train --resume --out {run_dir}`; or start a new run with another --out.')


def write_plots(run_dir, history, entry_steps, steps_per_epoch: int, *, ticket: bool = False,
                target_density=None) -> None:
  """``plots/accuracy.png``, ``plots/support.png``, (with a path) ``plots/entry_steps.png`` and (with a
  target density, or L0 gates) ``plots/density.png``."""
  plot_dir = pathlib.Path(run_dir) / 'plots'
  plots.plot_accuracy(history, plot_dir / 'accuracy.png', ticket=ticket)
  plots.plot_support(history, plot_dir / 'support.png', ticket=ticket)
  if target_density is not None or any(h.get('expected_density') is not None for h in history):
    plots.plot_density(history, plot_dir / 'density.png', target_density)
  if entry_steps:
    plots.plot_entry_steps(entry_steps, plot_dir / 'entry_steps.png', steps_per_epoch)


def write_run_plots(run_dir, *, ticket: bool = False) -> None:
  """:func:`write_plots` of the run in ``run_dir``, from its files (``metrics.jsonl``, ``path.npz``,
  ``config.json``); ``ticket``: the retraining of a ticket. Nothing for a run without an epoch."""
  run_dir = local_path(run_dir, '--run')
  history = read_history(run_dir)
  if not history:
    return
  entry_steps, steps_per_epoch = {}, 1
  if (run_dir / 'path.npz').is_file():
    arrays = read_npz(run_dir / 'path.npz')
    entry_steps = {k[len('entry_step/'):]: v for k, v in arrays.items() if k.startswith('entry_step/')}
    steps_per_epoch = int(arrays['steps_per_epoch'])
  target = getattr(load_config(run_dir).opt, 'target_density', None)
  write_plots(run_dir, history, entry_steps, steps_per_epoch, ticket=ticket, target_density=target)


def _write_atomic(file: pathlib.Path, text: str) -> None:
  tmp = file.with_name(file.name + '.tmp')
  try:
    tmp.write_text(text)
    os.replace(tmp, file)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
