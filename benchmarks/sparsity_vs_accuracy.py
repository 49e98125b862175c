"""Test accuracy against the fraction of weights and of filters kept, over seeds.

Every method trains with :func:`dessilbi_jax.train.fit` for the same number of
epochs (the same learning-rate schedule), on ``digits`` (LeNet-5) and
``mnist1d`` (the 1-D convnet), and on any prepared tfds dataset named with
``--datasets``:

* SGD-momentum and Adam: the dense accuracy to match;
* DessiLBI: the dense W at the end, the sparse model W ⊙ 1[Γ ≠ 0] at every
  epoch of the one run (the path), and the support of Γ at a few early epochs
  retrained from the run's initialization with SGD-momentum (tickets,
  :func:`dessilbi_jax.train.retrain_ticket`);
* gradual magnitude pruning (:func:`dessilbi_jax.baselines.gmp`, cubic
  schedule, then fine-tuning), per filter (DessiLBI's grouping: conv filters,
  single dense weights) and unstructured, each pruned to exactly the per-layer
  sparsity of the DessiLBI ticket it is compared with;
* proximal SGD with a group-lasso penalty
  (:func:`dessilbi_jax.baselines.prox_group_lasso`) at several λ.

"Weights kept" counts the non-zero entries of the kernels (rank >= 2 leaves);
"filters kept" the conv filters with a non-zero weight. Run::

  python -m benchmarks.sparsity_vs_accuracy [--quick] [--datasets digits mnist1d] [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional

import jax
import numpy as np

from dessilbi_jax import baselines
from dessilbi_jax import data
from dessilbi_jax import train

from benchmarks.common import RESULTS


@dataclasses.dataclass(frozen=True)
class Setting:
  """One dataset's benchmark: every method trains with the dataset's preset; the points measured."""
  dataset: str
  data_dir: Optional[str] = None
  # Tickets: the first epoch whose support holds part of every layer and this fraction of the filters.
  ticket_filters: tuple[float, ...] = (0.5, 0.75, 0.9)
  prox_lambdas: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)

  def config(self, optimizer: str = 'dessilbi', seed: int = 0) -> train.TrainConfig:
    """:func:`dessilbi_jax.train.preset` of the dataset with ``optimizer`` and ``seed``."""
    return train.preset(self.dataset, optimizer=optimizer, seed=seed, data_dir=self.data_dir)

  @property
  def model(self) -> str:
    return self.config().model

  @property
  def epochs(self) -> int:
    return self.config().epochs


QUICK = dict(ticket_filters=(0.5, 0.9), prox_lambdas=(3e-4, 1e-3))


def setting_for(name: str, quick: bool, data_dir=None) -> Setting:
  setting = Setting(name, data_dir)
  return dataclasses.replace(setting, **QUICK) if quick else setting


def kept(row: dict[str, Any]) -> tuple[float, float]:
  """(weights kept, filters kept) of a metrics row (its ``per_leaf`` table)."""
  leaves = [r for r in row['per_leaf'].values() if r['kind'] is not None]
  filters = [r for r in leaves if r['kind'] == 'filter']
  weights = sum(r['weights_kept'] for r in leaves) / sum(r['weights'] for r in leaves)
  groups = sum(r['groups'] for r in filters)
  return weights, (sum(r['groups_in_support'] for r in filters) / groups if groups else float('nan'))


def per_layer_sparsity(row: dict[str, Any], unit: str) -> dict[str, float]:
  """Per structured leaf path, the fraction of its groups (``'groups'``) or weights removed."""
  in_support = 'groups_in_support' if unit == 'groups' else 'weights_kept'
  return {path: 1.0 - r[in_support] / r[unit] for path, r in row['per_leaf'].items() if r['kind'] is not None}


def ticket_label(fraction: float) -> str:
  return f'>= {100 * fraction:.0f}% filters'


def ticket_epoch(history: list[dict[str, Any]], fraction: float):
  """The first epoch whose support holds a group of every layer and ``fraction`` of the filters."""
  for row in history:
    every_layer = all(r['groups_in_support'] > 0 for r in row['per_leaf'].values() if r['kind'] is not None)
    if every_layer and kept(row)[1] >= fraction:
      return row['epoch']
  return None


def _last_row(run_dir: pathlib.Path) -> dict[str, Any]:
  lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
  return json.loads(lines[-1])


def _point(method, label, acc, row, runs, **extra) -> dict[str, Any]:
  weights, filters = kept(row)
  # The network surgery gives of this model (dead units removed): params and MACs per example.
  return dict(method=method, label=label, acc=acc, weights_kept=weights, filters_kept=filters, runs=runs,
              compact_params=row.get('compact_params'), compact_macs=row.get('compact_macs'), **extra)


def run_seed(setting: Setting, seed: int, workdir: pathlib.Path) -> list[dict[str, Any]]:
  """Every method on one seed; returns the measured points."""
  fit = lambda cfg, **kw: train.fit(cfg, quiet=True, **kw)
  sgd_cfg = setting.config('sgd', seed)
  steps_per_epoch = data.steps_per_epoch(setting.dataset, sgd_cfg.batch_size)
  points = []
  for optimizer, method in (('sgd', 'SGD-momentum'), ('adam', 'Adam')):
    row = fit(setting.config(optimizer, seed)).history[-1]
    points.append(_point(method, 'dense', row['dense_test_acc'], row, runs=1))

  run_dir = workdir / f'{setting.dataset}-dessilbi-{seed}'
  history = train.fit(setting.config('dessilbi', seed), run_dir, quiet=True).history
  points.append(_point('DessiLBI dense W', 'dense', history[-1]['dense_test_acc'], history[-1], runs=1))
  for row in history:
    points.append(_point('DessiLBI W⊙1[Γ≠0] (path)', f'epoch {row["epoch"]}', row['sparse_test_acc'], row,
                         runs=1, epoch=row['epoch']))

  sgd = train.make_optimizer(sgd_cfg, steps_per_epoch)
  total_steps = sgd_cfg.epochs * steps_per_epoch
  for fraction in setting.ticket_filters:
    epoch = ticket_epoch(history, fraction)
    if epoch is None:
      continue
    label = ticket_label(fraction)
    ticket_dir = workdir / f'{setting.dataset}-ticket{100 * fraction:.0f}-{seed}'
    # The masked full-size retrain (its accuracy is the removed network's, tested), so that the ticket's rows
    # give the per-layer sparsity of the original network that GMP is pruned to; compact columns: removed.
    report = train.retrain_ticket(run_dir, epoch, init='rewind', out_dir=ticket_dir, quiet=True, compact=False)
    ticket_row = _last_row(ticket_dir)
    points.append(_point('DessiLBI ticket (rewind, retrained)', label, report['test_acc'],
                         ticket_row, runs=2, epoch=epoch))
    path_row = history[epoch - 1]
    points.append(_point('DessiLBI W⊙1[Γ≠0] at the ticket\'s epoch', label, path_row['sparse_test_acc'],
                         path_row, runs=1, epoch=epoch))
    for method, groups, unit in (('GMP per filter', None, 'groups'),
                                 ('GMP unstructured', baselines.unstructured, 'weights')):
      gmp = baselines.gmp(sgd, per_layer_sparsity(ticket_row, unit), groups=groups,
                          **baselines.pruning_steps(total_steps))
      row = fit(sgd_cfg, tx=gmp).history[-1]
      points.append(_point(method, label, row['dense_test_acc'], row, runs=1, epoch=epoch))

  for lam in setting.prox_lambdas:
    row = fit(dataclasses.replace(setting.config('prox_group_lasso', seed), penalty=lam)).history[-1]
    points.append(_point('prox. group lasso', f'λ={lam:g}', row['dense_test_acc'], row,
                         runs=len(setting.prox_lambdas), lam=lam))
  return points


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds of every (method, label)."""
  groups = defaultdict(list)
  for p in points:
    groups[(p['method'], p['label'])].append(p)
  rows = []
  for (method, label), ps in groups.items():
    stats = {k: (float(np.mean([p[k] for p in ps])), float(np.std([p[k] for p in ps])))
             for k in ('acc', 'weights_kept', 'filters_kept', 'compact_params', 'compact_macs')
             if all(p.get(k) is not None for p in ps)}
    epochs = [p['epoch'] for p in ps if p.get('epoch') is not None]
    rows.append(dict(method=method, label=label, runs=ps[0]['runs'], seeds=len(ps),
                     epochs=epochs, per_seed=[p['acc'] for p in ps], **stats))
  return rows


def _epochs(row) -> str:
  epochs = row['epochs']
  return str(epochs[0]) if len(set(epochs)) == 1 else f'{min(epochs)}–{max(epochs)}'


def _pm(stat, percent=True) -> str:
  mean, std = stat
  scale = 100 if percent else 1
  return f'{scale * mean:.1f} ± {scale * std:.1f}'


def _size(row, key) -> str:
  """Mean compact params or MACs over seeds ('–' where a run has none)."""
  return f'{row[key][0]:,.0f}' if key in row else '–'


def _per_seed(row) -> str:
  """Every seed's accuracy: a run that collapsed shows here, not only as a large spread."""
  return ', '.join(f'{100 * acc:.1f}' for acc in row['per_seed'])


def _table(rows, header) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return lines


def report(setting: Setting, rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
  """Markdown tables for one dataset, and the verdict lines of the bar."""
  by = {(r['method'], r['label']): r for r in rows}
  dense = {m: by[(m, 'dense')] for m in ('SGD-momentum', 'Adam', 'DessiLBI dense W')}
  last = by[('DessiLBI W⊙1[Γ≠0] (path)', f'epoch {setting.epochs}')]
  early = ticket_label(setting.ticket_filters[0])
  ticket = by.get(('DessiLBI ticket (rewind, retrained)', early))
  seeds = dense['SGD-momentum']['seeds']
  lines = [f'## {setting.dataset} ({setting.model}, {setting.epochs} epochs, {seeds} seeds)', '',
           f'Test accuracy in %, mean ± standard deviation over {seeds} seeds; kept fractions in %; compact params '
           f'and MACs (per example): the network with the dead units removed (`dessilbi compact`), mean over seeds.', '',
           '### Summary (the issue-4 report)', '']
  sizes = lambda r: [_size(r, 'compact_params'), _size(r, 'compact_macs')]
  summary = [
      ['SGD-momentum, dense (same epochs and schedule)', _pm(dense['SGD-momentum']['acc']),
       _per_seed(dense['SGD-momentum']), '100', '100', *sizes(dense['SGD-momentum'])],
      ['Adam, dense', _pm(dense['Adam']['acc']), _per_seed(dense['Adam']), '100', '100', *sizes(dense['Adam'])],
      ['DessiLBI, dense W', _pm(dense['DessiLBI dense W']['acc']), _per_seed(dense['DessiLBI dense W']), '100', '100',
       '–', '–'],
      [f'DessiLBI, sparse W⊙1[Γ≠0] at the end (epoch {setting.epochs})', _pm(last['acc']), _per_seed(last),
       _pm(last['weights_kept']), _pm(last['filters_kept']), *sizes(last)],
  ]
  if ticket:
    summary.append([f'DessiLBI, earliest ticket ({early}, epoch {_epochs(ticket)}) retrained', _pm(ticket['acc']),
                    _per_seed(ticket), _pm(ticket['weights_kept']), _pm(ticket['filters_kept']), *sizes(ticket)])
  lines += _table(summary, ['model', 'test acc', 'per seed', 'weights kept', 'filters kept', 'compact params',
                            'compact MACs'])
  lines += ['', '### Same sparsity, every method', '',
            'Tickets: the support of Γ at the first epoch that holds part of every layer and at least the '
            'given fraction of the conv filters (the epoch differs by seed). '
            'GMP is pruned to exactly the per-layer sparsity of the ticket in the same row group '
            '(same filters per conv layer for "per filter", same weights per layer for "unstructured"). '
            '"runs" counts the training runs needed to get that model: the DessiLBI path gives every '
            'epoch\'s sparse model from one run and a ticket needs one retraining more; GMP needs one run '
            'per target sparsity, chosen in advance; the group lasso needs a sweep over λ, since λ '
            'fixes the sparsity only after the fact.', '']
  same = []
  for fraction in setting.ticket_filters:
    for method in ('DessiLBI W⊙1[Γ≠0] at the ticket\'s epoch', 'DessiLBI ticket (rewind, retrained)',
                   'GMP per filter', 'GMP unstructured'):
      r = by.get((method, ticket_label(fraction)))
      if r:
        same.append([method, f'{r["label"]} (epoch {_epochs(r)}, {r["seeds"]} seeds)', _pm(r['acc']), _per_seed(r),
                     _pm(r['weights_kept']), _pm(r['filters_kept']), *sizes(r), str(r['runs'])])
  for r in rows:
    if r['method'] == 'prox. group lasso':
      same.append([r['method'], r['label'], _pm(r['acc']), _per_seed(r), _pm(r['weights_kept']),
                   _pm(r['filters_kept']), *sizes(r), str(r['runs'])])
  lines += _table(same, ['method', 'point', 'test acc', 'per seed', 'weights kept', 'filters kept',
                         'compact params', 'compact MACs', 'runs'])

  gap_dense = 100 * (dense['DessiLBI dense W']['acc'][0] - dense['SGD-momentum']['acc'][0])
  gmp = by.get(('GMP per filter', early))
  if ticket and gmp:
    gap_ticket = 100 * (ticket['acc'][0] - gmp['acc'][0])
    verdict = [f'- {setting.dataset}: earliest ticket ({early}, epoch {_epochs(ticket)}) retrained '
               f'{_pm(ticket["acc"])} vs GMP per filter at the same {100 * ticket["filters_kept"][0]:.0f}% of '
               f'filters {_pm(gmp["acc"])}: {"met" if gap_ticket >= 0 else "NOT met"} ({gap_ticket:+.1f} points).']
  else:
    verdict = [f'- {setting.dataset}: NOT met: no epoch of the path held {early} with every layer present.']
  verdict.append(
      f'- {setting.dataset}: dense DessiLBI {_pm(dense["DessiLBI dense W"]["acc"])} vs SGD-momentum '
      f'{_pm(dense["SGD-momentum"]["acc"])} (seeds: {_per_seed(dense["SGD-momentum"])}): '
      f'{"met" if gap_dense >= -1.0 else "NOT met"} ({gap_dense:+.1f} points; the bar is within 1 point).')
  trained = [acc for acc in dense['SGD-momentum']['per_seed'] if acc > 0.5]
  if len(trained) < dense['SGD-momentum']['seeds']:
    gap = 100 * (dense['DessiLBI dense W']['acc'][0] - np.mean(trained)) if trained else float('nan')
    verdict.append(
        f'  {dense["SGD-momentum"]["seeds"] - len(trained)} SGD-momentum run(s) collapsed to a constant '
        f'prediction at this learning rate; no DessiLBI run did (a likely reason: its coupling (W − Γ)/ν '
        f'damps W like a weight decay of 1/ν). Against the other SGD seeds\' mean the gap is {gap:+.1f} points.')
  return lines, verdict


def plot(settings: list[Setting], rows_by_dataset: dict[str, list[dict]], path: pathlib.Path) -> None:
  """Accuracy against weights kept and filters kept, one curve per method, one row per dataset."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
  for (ax_w, ax_f), setting in zip(axes, settings):
    rows = rows_by_dataset[setting.dataset]
    # The path curve already holds the sparse models at the tickets' epochs.
    methods = [m for m in dict.fromkeys(r['method'] for r in rows) if 'ticket\'s epoch' not in m]
    for method in methods:
      for ax, key in ((ax_w, 'weights_kept'), (ax_f, 'filters_kept')):
        points = sorted((r for r in rows if r['method'] == method), key=lambda r: r[key][0])
        x = [100 * r[key][0] for r in points]
        y = [100 * r['acc'][0] for r in points]
        err = [100 * r['acc'][1] for r in points]
        style = dict(marker='o', markersize=4, capsize=2, label=method)
        if len(points) == 1:
          ax.errorbar(x, y, yerr=err, linestyle='none', **style)
        else:
          ax.errorbar(x, y, yerr=err, **style)
    for ax, what in ((ax_w, 'weights'), (ax_f, 'conv filters')):
      ax.set_xlabel(f'{what} kept (%)')
      ax.set_ylabel('test accuracy (%)')
      ax.set_title(f'{setting.dataset} ({setting.model})')
      ax.grid(alpha=0.3)
    ax_f.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def describe(cfg: train.TrainConfig) -> str:
  """One line of a preset's hyperparameters."""
  lambdas = (', '.join(f'{lam:g} for {kind}' for kind, lam in cfg.lambdas) if isinstance(cfg.lambdas, tuple)
             else f'{cfg.lambdas:g}')
  decays = ', '.join(str(e) for e in cfg.lr_decay_epochs) or 'never'
  return (f'{cfg.model}, {cfg.epochs} epochs of batch {cfg.batch_size}, lr {cfg.lr:g} × {cfg.lr_decay:g} after '
          f'epoch {decays}, momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g}; DessiLBI κ = '
          f'{cfg.kappa:g}, ν = {cfg.mu:g}, λ = {lambdas}{" (groups normalized)" if cfg.normalize_groups else ""}.')


def markdown(settings: list[Setting], rows_by_dataset: dict[str, list[dict]], minutes: float, quick: bool) -> str:
  """The results file: how it was run, the verdicts of the bar, the tables of every dataset."""
  from benchmarks.common import machine
  body, verdicts = [], []
  for setting in settings:
    lines, verdict = report(setting, rows_by_dataset[setting.dataset])
    body += lines + ['']
    verdicts += verdict
  if any('NOT met' in v for v in verdicts):
    verdicts += [
        '', 'Where a line says NOT met: the presets were chosen on a held-out fifth of the training split, '
        'not on this test set, and are not re-tuned to pass it; compare the gap with the per-seed columns '
        'below. A rewound ticket restarts from the initialization on a support fixed early in the path, '
        'while GMP trains every weight for the first 10% of the run and prunes gradually, so where the '
        'ticket\'s support still holds most filters GMP\'s extra training can win.']
  return '\n'.join([
      '# Sparsity against accuracy', '',
      f'Machine: {machine()}. Mode: {"--quick" if quick else "full"}, {minutes:.1f} minutes in all. '
      f'Regenerate with `python -m benchmarks.sparsity_vs_accuracy{" --quick" if quick else ""}` '
      '(or `python -m benchmarks.run_all`).', '',
      'Every method trains with the dataset\'s preset (`dessilbi_jax.train.PRESETS`, what '
      '`dessilbi train --dataset NAME` runs): the same epochs, batch and learning-rate schedule; Adam '
      'starts from α = 1e-3. Tickets are retrained with SGD-momentum for the same epochs from the run\'s '
      'initialization; GMP prunes from 10% to 60% of the run (cubic schedule) and fine-tunes for the last '
      '40%.', '',
      *[f'- {s.dataset}: {describe(s.config())}' for s in settings], '',
      '## The bar', '',
      *verdicts, '',
      '![accuracy against fraction kept](sparsity_vs_accuracy.png)', '',
      *body,
  ])


def run(datasets=('digits', 'mnist1d'), seeds: int = 3, quick: bool = False, data_dir=None) -> str:
  """Runs the benchmark; writes ``results/sparsity_vs_accuracy.{md,png,json}``; returns the markdown."""
  start = time.perf_counter()
  settings = [setting_for(name, quick, data_dir) for name in datasets]
  for setting in settings:
    train.check_config(setting.config())
  points_by_dataset = {}
  with tempfile.TemporaryDirectory(prefix='dessilbi-bench-') as workdir:
    for setting in settings:
      points = []
      for seed in range(seeds):
        points += [dict(p, seed=seed) for p in run_seed(setting, seed, pathlib.Path(workdir))]
        print(f'{setting.dataset} seed {seed} done ({time.perf_counter() - start:.0f} s)', flush=True)
      points_by_dataset[setting.dataset] = points
  rows_by_dataset = {name: aggregate(points) for name, points in points_by_dataset.items()}
  minutes = (time.perf_counter() - start) / 60

  text = markdown(settings, rows_by_dataset, minutes, quick)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / 'sparsity_vs_accuracy.md').write_text(text)
  (RESULTS / 'sparsity_vs_accuracy.json').write_text(json.dumps(
      {'presets': {s.dataset: s.config().to_json() for s in settings},
       'settings': [dataclasses.asdict(s) for s in settings], 'points': points_by_dataset}, indent=1) + '\n')
  plot(settings, rows_by_dataset, RESULTS / 'sparsity_vs_accuracy.png')
  return text


def use_compilation_cache(directory: str) -> None:
  """Seeds repeat the same programs: a persistent compilation cache saves most of the compile time."""
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='two tickets and two λ per seed (under 10 minutes on 2 CPU cores)')
  parser.add_argument('--datasets', nargs='+', default=['digits', 'mnist1d'],
                      help='digits, mnist1d, or prepared tfds datasets (mnist, fashion_mnist, cifar10, ...)')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--data-dir', default=None)
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f'--seeds must be >= 1, got {args.seeds}.')
  unknown = [d for d in args.datasets if d not in data.DATASETS]
  if unknown:
    parser.error(f'unknown dataset(s) {unknown}; choose among {list(data.DATASETS)}.')
  with tempfile.TemporaryDirectory(prefix='dessilbi-jax-cache-') as cache:
    use_compilation_cache(cache)
    print(run(args.datasets, args.seeds, args.quick, args.data_dir))


if __name__ == '__main__':
  main()
