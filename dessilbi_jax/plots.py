"""PNG plots of a training run (matplotlib, no display needed).

``history`` is the list of per-epoch metric dicts that :func:`dessilbi_jax.train.fit`
returns and writes to ``metrics.jsonl``. Figures are built with
``matplotlib.figure.Figure`` directly, so nothing touches pyplot's global state
or needs a display.

Example::

  >>> import tempfile, pathlib
  >>> from dessilbi_jax import plots
  >>> history = [{'epoch': 1, 'dense_test_acc': 0.8, 'sparse_test_acc': 0.5},
  ...            {'epoch': 2, 'dense_test_acc': 0.9, 'sparse_test_acc': 0.85}]
  >>> path = pathlib.Path(tempfile.mkdtemp()) / 'accuracy.png'
  >>> plots.plot_accuracy(history, path)
  >>> path.exists()
  True
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter


def plot_accuracy(history: Sequence[Mapping], path, *, ticket: bool = False) -> None:
  """Dense (W) and sparse (W ⊙ 1[Γ≠0]) test accuracy against epoch."""
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  epochs = [h['epoch'] for h in history]
  for key, label in (('dense_test_acc', 'dense W'), ('sparse_test_acc', 'sparse W ⊙ 1[Γ≠0]')):
    values = [h.get(key) for h in history]
    if any(v is not None for v in values):
      ax.plot(epochs, [np.nan if v is None else v for v in values], marker='.', label=label)
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_support(history: Sequence[Mapping], path, *, ticket: bool = False) -> None:
  """The path: per structured layer, the fraction of its groups in Γ's support.

  (For runs without Γ, e.g. retrained tickets: the groups with a non-zero weight.)
  """
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  epochs = [h['epoch'] for h in history]
  leaves = [name for name, row in history[-1]['per_leaf'].items() if row['groups']] if history else []
  for name in leaves:
    fractions = [h['per_leaf'][name]['groups_in_support'] / h['per_leaf'][name]['groups'] for h in history]
    kind = history[-1]['per_leaf'][name]['kind']
    ax.plot(epochs, fractions, marker='.', label=f'{name} ({kind})')
  ax.set_xlabel('epoch')
  ax.set_ylabel('fraction of groups kept')
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  if leaves:
    ax.legend(fontsize='small')
  _save(fig, path)


def plot_entry_steps(entry_steps: Mapping[str, np.ndarray], path, steps_per_epoch: int = 0) -> None:
  """Histogram of the steps at which groups entered Γ's support, stacked by layer.

  ``entry_steps`` maps a leaf path to its per-group entry steps (``-1``: never
  entered; counted in the legend). With ``steps_per_epoch`` the axis is in epochs.
  """
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  scale = steps_per_epoch or 1
  entered, labels = [], []
  for name, steps in entry_steps.items():
    steps = np.asarray(steps).reshape(-1)
    entered.append(steps[steps >= 0] / scale)
    labels.append(f'{name}: {int(np.sum(steps < 0))}/{steps.size} never')
  if entered and any(e.size for e in entered):
    ax.hist(entered, bins=30, stacked=True, label=labels)
    ax.legend(fontsize='small')
  ax.set_xlabel('entry epoch' if steps_per_epoch else 'entry step')
  ax.set_ylabel('groups')
  ax.grid(alpha=0.3)
  _save(fig, path)


def _save(fig: Figure, path) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_widths(history: Sequence[Mapping], path) -> None:
  """Growth: the width of every growable layer against epoch, the growth rounds marked.

  Reads each row's ``widths`` (per layer) and ``grown`` (the layers widened at
  that epoch), as the growth extension writes them.
  """
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  rows = [h for h in history if h.get('widths')]
  epochs = [h['epoch'] for h in rows]
  layers = list(rows[-1]['widths']) if rows else []
  for name in layers:
    # A row's width is the one the layer had during that epoch; a round at epoch e widens from e + 1.
    widths = [h['widths'].get(name, np.nan) for h in rows]
    ax.step(epochs, widths, where='pre', marker='.', label=name)
  rounds = [h['epoch'] for h in rows if h.get('grown')]
  for i, epoch in enumerate(rounds):
    ax.axvline(epoch, color='grey', linestyle=':', linewidth=1, label='growth round' if i == 0 else None)
  stopped = [h['epoch'] for h in rows if h.get('growth') == 'stopped']
  if stopped:
    ax.axvline(stopped[0], color='black', linestyle='--', linewidth=1, label='no layer grew: stop')
  finetune = [h['epoch'] for h in rows if h.get('growth') == 'finetune']
  if finetune:
    ax.axvspan(finetune[0] - 1, finetune[-1], color='grey', alpha=0.12, label='fine-tuning')
  ax.set_xlabel('epoch')
  ax.set_ylabel('width (units, log scale)')
  ax.set_yscale('log', base=2)
  ax.yaxis.set_major_formatter(ScalarFormatter())
  ax.yaxis.set_minor_formatter(NullFormatter())
  if layers:
    ax.set_yticks(sorted({*rows[0]['widths'].values(), *rows[-1]['widths'].values()}))   # start and end
  ax.grid(alpha=0.3)
  if layers:
    ax.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.01, 0.5))
  _save(fig, path)
