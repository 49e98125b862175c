"""PNG plots of a training run (matplotlib, no display needed).

``history`` is the list of per-epoch metric dicts that :func:`dessilbi_jax.train.fit`
returns and writes to ``metrics.jsonl``. Figures are built with
``matplotlib.figure.Figure`` directly, so nothing touches pyplot's global state
or needs a display.

Example::

  >>> import tempfile, pathlib
  >>> from dessilbi_jax.train import plots
  >>> history = [{'epoch': 1, 'dense_test_acc': 0.8, 'sparse_test_acc': 0.5},
  ...            {'epoch': 2, 'dense_test_acc': 0.9, 'sparse_test_acc': 0.85}]
  >>> path = pathlib.Path(tempfile.mkdtemp()) / 'accuracy.png'
  >>> fig = plots.plot_accuracy(history, path)
  >>> path.exists()
  True
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter


def plot_accuracy(history: Sequence[Mapping], path, *, ticket: bool = False) -> Figure:
  """Dense (W) and sparse (W ⊙ 1[Γ≠0]) test accuracy against epoch; a ticket's: its masked network."""
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  epochs = [h['epoch'] for h in history]
  curves = ((('dense_test_acc', 'ticket: masked W (pruned weights stay 0)'),) if ticket else
            (('dense_test_acc', 'dense W'), ('sparse_test_acc', 'sparse W ⊙ 1[Γ≠0]')))
  for key, label in curves:
    values = [h.get(key) for h in history]
    if any(v is not None for v in values):
      ax.plot(epochs, [np.nan if v is None else v for v in values], marker='.', label=label)
  ax.set_xlabel('epoch (of retraining)' if ticket else 'epoch')
  ax.set_ylabel('test accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_support(history: Sequence[Mapping], path, *, ticket: bool = False) -> Figure:
  """The path: per structured layer, the fraction of its groups in Γ's support (legend beside the axes).

  For runs without Γ, the groups with a non-zero weight; for a ticket
  (``ticket=True``), whose mask is fixed, one bar per layer: the fraction of
  its groups the mask keeps.
  """
  leaves = [name for name, row in history[-1]['per_leaf'].items() if row['groups']] if history else []
  fraction = lambda h, name: h['per_leaf'][name]['groups_in_support'] / h['per_leaf'][name]['groups']
  if ticket:
    fig = Figure(figsize=(7, 1.2 + 0.45 * max(1, len(leaves))))
    ax = fig.add_subplot()
    kept = [fraction(history[-1], name) for name in leaves]
    labels = [f'{name} ({history[-1]["per_leaf"][name]["kind"]})' for name in leaves]
    ax.barh(labels, kept)
    for y, value in enumerate(kept):
      ax.text(min(value, 0.85) + 0.01, y, f'{100 * value:.1f}%', va='center')
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of groups the ticket's mask keeps (fixed while retraining)")
    ax.grid(alpha=0.3, axis='x')
    return _save(fig, path)
  fig = Figure(figsize=(9, 4))
  ax = fig.add_subplot()
  epochs = [h['epoch'] for h in history]
  for name in leaves:
    kind = history[-1]['per_leaf'][name]['kind']
    # Layers that appear mid-run (growth) have no point before.
    ax.plot(epochs, [fraction(h, name) if name in h['per_leaf'] else np.nan for h in history], marker='.',
            label=f'{name} ({kind})')
  ax.set_xlabel('epoch')
  ax.set_ylabel("fraction of groups in Γ's support")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  if leaves:
    ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  return _save(fig, path)


def plot_entry_steps(entry_steps: Mapping[str, np.ndarray], path, steps_per_epoch: int = 0) -> Figure:
  """Per layer, a histogram of the steps at which its groups entered Γ's support (one panel each).

  ``entry_steps`` maps a leaf path to its per-group entry steps (``-1``: never
  entered; counted in the panel's title). One panel per layer keeps a few conv
  filters visible beside thousands of single dense weights. With
  ``steps_per_epoch`` the axis is in epochs.
  """
  names = list(entry_steps)
  fig = Figure(figsize=(7, 1.0 + 1.6 * max(1, len(names))))
  scale = steps_per_epoch or 1
  entered = {name: np.asarray(steps).reshape(-1) for name, steps in entry_steps.items()}
  latest = max([e.max() for e in entered.values() if e.size and e.max() >= 0] or [scale]) / scale
  axes = fig.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)[:, 0]
  for ax, name in zip(axes, names):
    steps = entered[name]
    ax.hist(steps[steps >= 0] / scale, bins=30, range=(0, latest))
    ax.set_title(f'{name}: {int(np.sum(steps >= 0))} of {steps.size} groups entered, '
                 f'{int(np.sum(steps < 0))} never', fontsize='small', loc='left')
    ax.set_ylabel('groups')
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel('entry epoch' if steps_per_epoch else 'entry step')
  return _save(fig, path)


def plot_widths(history: Sequence[Mapping], path) -> Figure:
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
  return _save(fig, path)


def plot_density(history: Sequence[Mapping], path, target=None) -> Figure:
  """The density of the network against epoch, with the target as a dashed line.

  An L0 run: the gates' expected density (``expected_density``); a DessiLBI
  run: the fraction of the structured weights in Γ's support (``weights_kept``).
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  epochs = [h['epoch'] for h in history]
  l0 = any(h.get('expected_density') is not None for h in history)
  key, label = (('expected_density', 'L0 gates: expected density') if l0 else
                ('weights_kept', "DessiLBI: weights in Γ's support"))
  ax.plot(epochs, [100 * h[key] if h.get(key) is not None else np.nan for h in history], marker='.', label=label)
  if target is not None:
    ax.axhline(100 * target, color='k', linestyle='--', linewidth=1, label=f'target {100 * target:g} %')
  ax.set_xlabel('epoch')
  ax.set_ylabel('density of the structured weights (%)')
  ax.set_ylim(0, 105)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def _save(fig: Figure, path) -> Figure:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()  # keeps a legend placed beside the axes inside the figure
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return fig
