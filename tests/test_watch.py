"""What a user watches: the end-of-run summary, the plots, the first-use message, --version and --help."""

import json
import pathlib

import numpy as np
import pytest

import dessilbi_jax
from dessilbi_jax import cli
from dessilbi_jax import data
from dessilbi_jax import models
from dessilbi_jax.train import plots
from dessilbi_jax import train

TINY = ['--widths', '4', '8', '16', '16', '--batch-size', '128', '--lr', '0.05']


def test_the_summary_prints_under_quiet_and_names_the_next_step(copy_run, capsys):
  out = copy_run()   # conftest.py's 2-epoch run (these flags), taken to 3 epochs
  assert cli.main(['train', '--resume', '--epochs', '3', '--quiet', '--out', str(out)]) == 0
  captured = capsys.readouterr()
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  last = rows[-1]
  # The earliest epoch whose sparse accuracy is within a point of the last one's, found by hand.
  epoch = min(r['epoch'] for r in rows if r['sparse_test_acc'] >= last['sparse_test_acc'] - 0.01)
  assert captured.out.splitlines()[0].startswith('Done in ')
  assert (f'3 epochs: test accuracy dense {100 * last["dense_test_acc"]:.1f}%, sparse '
          f'{100 * last["sparse_test_acc"]:.1f}% (W ⊙ 1[Γ≠0], keeping {100 * last["weights_kept"]:.1f}% of the '
          'weights, filters ') in captured.out
  assert f'Files in {out}/' in captured.out
  assert captured.out.rstrip().endswith(f'dessilbi ticket --run {out} --epoch {epoch}')
  assert 'epoch   1/3' not in captured.out   # --quiet: no per-epoch lines
  # Not a terminal: no progress bar in the log either, with or without --quiet.
  assert cli.main(['train', '--resume', '--out', str(out), '--epochs', '4']) == 0
  captured = capsys.readouterr()
  assert 'epoch   4/4' in captured.out and '\r' not in captured.err and 'steps_per_s' not in captured.err


def _history(layers=('Conv_0/kernel', 'Dense_0/kernel'), epochs=4):
  per_leaf = lambda e: {name: {'kind': 'filter' if 'Conv' in name else 'lasso', 'groups': 10,
                               'groups_in_support': min(10, 3 * e), 'weights': 100, 'weights_kept': 30}
                        for name in layers}
  return [{'epoch': e, 'dense_test_acc': 0.5 + 0.1 * e, 'sparse_test_acc': 0.4 + 0.1 * e, 'per_leaf': per_leaf(e)}
          for e in range(1, epochs + 1)]


def test_entry_steps_get_one_panel_per_layer(tmp_path):
  entry = {'Conv_0/kernel': np.array([3, 5, -1]), 'Dense_0/kernel': np.r_[np.arange(5000) % 40, -np.ones(100)]}
  fig = plots.plot_entry_steps(entry, tmp_path / 'entry.png', steps_per_epoch=2)
  assert len(fig.axes) == 2
  assert [ax.get_title(loc='left') for ax in fig.axes] == [
      'Conv_0/kernel: 2 of 3 groups entered, 1 never', 'Dense_0/kernel: 5000 of 5100 groups entered, 100 never']
  # The two filters that entered are counted in their own panel, not under 5,000 dense weights.
  assert sum(p.get_height() for p in fig.axes[0].patches) == 2
  assert (tmp_path / 'entry.png').stat().st_size > 0


def test_the_support_legend_sits_beside_the_curves(tmp_path):
  fig = plots.plot_support(_history(), tmp_path / 'support.png')
  ax = fig.axes[0]
  renderer = fig._get_renderer()   # the Agg renderer the PNG was drawn with
  assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_a_tickets_plots_say_what_they_show(tmp_path):
  fig = plots.plot_accuracy(_history(), tmp_path / 'accuracy.png', ticket=True)
  labels = [line.get_label() for line in fig.axes[0].get_lines()]
  assert labels == ['ticket: masked W (pruned weights stay 0)']
  fig = plots.plot_support(_history(), tmp_path / 'support.png', ticket=True)
  bars = fig.axes[0].patches
  assert [b.get_width() for b in bars] == [1.0, 1.0]   # its mask's fraction per layer, not flat lines
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ['Conv_0/kernel (filter)', 'Dense_0/kernel (lasso)']


def test_preparing_an_offline_dataset_says_nothing_is_downloaded(tmp_path, capfd):
  x, _ = data.load_arrays('digits', 'test', data_dir=str(tmp_path))
  assert x.shape == (355, 8, 8, 1)
  captured = capfd.readouterr()
  assert 'Downloading' not in captured.out + captured.err
  assert f'Preparing the offline dataset digits in {tmp_path}' in captured.err
  assert 'nothing is downloaded' in captured.err
  data.load_arrays('digits', 'test', data_dir=str(tmp_path))
  assert 'Preparing' not in capfd.readouterr().err   # prepared once


def test_version_and_help_list_what_there_is(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(['--version'])
  assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f'dessilbi-jax {dessilbi_jax.__version__}'
  with pytest.raises(SystemExit):
    cli.main(['train', '--help'])
  text = ' '.join(capsys.readouterr().out.split())
  for name in (*data.DATASETS, *models.list_models()):
    assert name in text
