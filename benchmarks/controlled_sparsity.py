"""Controlled sparsity: does each method end on the density it was asked for, and how accurate is it there?

On ``digits`` (LeNet-5) and ``mnist1d`` (the 1-D convnet), every method trains
with the dataset's preset (the same epochs and learning-rate schedule) for each
target density ε of the structured weights (conv kernels and dense kernels),
over seeds:

* DessiLBI with a target (``dessilbi train --target-density ε``): dual ascent
  on λ (the default) and the budget cap (``--target-method budget``); the
  network measured is W ⊙ 1[Γ ≠ 0] at the end, its density the support's;
  and GMP's schedule for it: the target run for the first 60 % of the epochs,
  then its support fine-tuned with SGD-momentum for the rest (the same epochs
  in all, ``fit(masks=dl.support(state), init_params=params)``);
* L0 gates under a density constraint (``--optimizer l0 --target-density ε``,
  Gallego-Posada et al. 2022): the expected density of the gates and the
  accuracy of the purged network (median gates folded in, shut units removed);
* the penalized L0 baseline (``--optimizer l0_penalty --penalty λ``) at a few λ:
  where each lands;
* gradual magnitude pruning, unstructured, to a per-layer density of ε.

Besides the targets, ``--extra-density`` adds one density chosen when the
benchmark is run, to show that nothing is tuned to the three. Run::

  python -m benchmarks.controlled_sparsity [--seeds 3] [--targets 0.1 0.25 0.5] [--extra-density 0.37]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np

import dessilbi_jax as dl

from dessilbi_jax import baselines
from dessilbi_jax import data
from dessilbi_jax import train

from benchmarks.common import RESULTS
from benchmarks.common import machine
from benchmarks.sparsity_vs_accuracy import kept
from benchmarks.sparsity_vs_accuracy import use_compilation_cache

TARGETS = (0.1, 0.25, 0.5)
PENALTIES = (1e-2, 1e-1)
METHODS = ('dessilbi', 'dessilbi_finetune', 'dessilbi_budget', 'l0', 'l0_penalty', 'gmp')
SEARCH = 0.6   # dessilbi_finetune: the fraction of the epochs that DessiLBI searches; the rest fine-tunes
NAMES = {'dessilbi': 'DessiLBI, target (dual ascent on λ)',
         'dessilbi_finetune': 'DessiLBI, target, 60 % of the epochs, then its support fine-tuned',
         'dessilbi_budget': 'DessiLBI, target (budget cap)',
         'l0': 'L0 gates, constrained', 'l0_penalty': 'L0 gates, penalized', 'gmp': 'GMP unstructured'}


def _row(cfg, **kw) -> dict[str, Any]:
  return train.fit(cfg, quiet=True, **kw).history[-1]


def measure(dataset: str, method: str, value: float, seed: int) -> dict[str, Any]:
  """One run: ``value`` is the target density (the penalty for ``l0_penalty``)."""
  cfg = train.preset(dataset, seed=seed)
  point = dict(dataset=dataset, method=method, value=value, seed=seed)
  if method in ('dessilbi', 'dessilbi_budget'):
    row = _row(dataclasses.replace(cfg, target_density=value,
                                   target_method='budget' if method == 'dessilbi_budget' else 'dual'))
    return dict(point, density=row['weights_kept'], acc=row['sparse_test_acc'],
                compact_acc=row.get('compact_test_acc'), params=row.get('compact_params'),
                macs=row.get('compact_macs'))
  if method == 'dessilbi_finetune':
    # GMP's schedule for DessiLBI: search the support for the first 60 % of the epochs, then fine-tune W on it
    # with SGD-momentum (its weights outside the support exactly 0) for the rest, the lr schedule continued.
    search = round(SEARCH * cfg.epochs)
    # The support must reach ε in 60 % of the epochs: a dual step five times the default's.
    first = train.fit(dataclasses.replace(cfg, target_density=value, epochs=search, dual_lr=0.05), quiet=True)
    decays = [e for e in cfg.lr_decay_epochs if e <= search]
    finetune = dataclasses.replace(cfg, optimizer='sgd', epochs=cfg.epochs - search,
                                   lr=cfg.lr * cfg.lr_decay ** len(decays),
                                   lr_decay_epochs=tuple(e - search for e in cfg.lr_decay_epochs if e > search))
    row = _row(finetune, masks=dl.support(first.opt_state), init_params=first.params)
    return dict(point, density=kept(row)[0], acc=row['dense_test_acc'], params=row.get('compact_params'),
                macs=row.get('compact_macs'))
  if method in ('l0', 'l0_penalty'):
    changes = dict(target_density=value) if method == 'l0' else dict(penalty=value)
    row = _row(train.preset(dataset, seed=seed, optimizer=method, **changes))   # its α: half the preset's
    return dict(point, density=row['expected_density'], acc=row['purged_test_acc'],
                params=row.get('purged_params'), macs=row.get('purged_macs'),
                multiplier=row.get('multiplier_max'))
  if method == 'gmp':
    sgd_cfg = dataclasses.replace(cfg, optimizer='sgd')
    steps_per_epoch = data.steps_per_epoch(dataset, cfg.batch_size)
    sgd = train.make_optimizer(sgd_cfg, steps_per_epoch)
    gmp = baselines.gmp(sgd, 1.0 - value, groups=baselines.unstructured,
                        **baselines.pruning_steps(cfg.epochs * steps_per_epoch))
    row = _row(sgd_cfg, tx=gmp)
    return dict(point, density=kept(row)[0], acc=row['dense_test_acc'], params=row.get('compact_params'),
                macs=row.get('compact_macs'))
  raise ValueError(f'Unknown method {method!r}; choose among {METHODS}.')


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and standard deviation over seeds of every (dataset, method, value)."""
  groups = defaultdict(list)
  for p in points:
    groups[(p['dataset'], p['method'], p['value'])].append(p)
  rows = []
  for (dataset, method, value), ps in groups.items():
    stat = lambda key: ((float(np.mean([p[key] for p in ps])), float(np.std([p[key] for p in ps])))
                        if all(p.get(key) is not None for p in ps) else None)
    rows.append(dict(dataset=dataset, method=method, value=value, seeds=len(ps),
                     density=stat('density'), acc=stat('acc'), params=stat('params'), macs=stat('macs'),
                     miss=max(abs(p['density'] - value) for p in ps) if method != 'l0_penalty' else None,
                     per_seed=[p['acc'] for p in ps], per_seed_density=[p['density'] for p in ps]))
  return rows


def _pm(stat, scale=100.0, digits=1) -> str:
  return '–' if stat is None else f'{scale * stat[0]:.{digits}f} ± {scale * stat[1]:.{digits}f}'


def report(rows: list[dict[str, Any]], targets, extra) -> tuple[list[str], list[str]]:
  """The tables of every dataset and the verdicts of the bars."""
  lines, verdicts = [], []
  for dataset in dict.fromkeys(r['dataset'] for r in rows):
    mine = [r for r in rows if r['dataset'] == dataset]
    by = {(r['method'], r['value']): r for r in mine}
    lines += [f'## {dataset} ({train.preset(dataset).model}, {train.preset(dataset).epochs} epochs, '
              f'{mine[0]["seeds"]} seeds)', '',
              '| method | target ε (λ for penalized) | density reached | worst miss over seeds (points) | test acc '
              '| per seed | params | MACs |', '|---|---:|---:|---:|---:|---|---:|---:|']
    for r in sorted(mine, key=lambda r: (METHODS.index(r['method']), r['value'])):
      label = f'λ = {r["value"]:g}' if r['method'] == 'l0_penalty' else f'{100 * r["value"]:g} %'
      if r['method'] != 'l0_penalty' and r['value'] == extra:
        label += ' (chosen at run time)'
      miss = '–' if r['miss'] is None else f'{100 * r["miss"]:.2f}'
      per_seed = ', '.join(f'{100 * a:.1f}' for a in r['per_seed'])
      size = lambda s: '–' if s is None else f'{s[0]:,.0f}'
      lines.append(f'| {NAMES[r["method"]]} | {label} | {_pm(r["density"])} | {miss} | {_pm(r["acc"])} | '
                   f'{per_seed} | {size(r["params"])} | {size(r["macs"])} |')
    lines.append('')
    for method in ('l0', 'dessilbi', 'dessilbi_finetune', 'dessilbi_budget'):
      mine_m = [by[(method, t)] for t in [*targets, *([extra] if extra else [])] if (method, t) in by]
      if mine_m:
        worst = max(r['miss'] for r in mine_m)
        verdicts.append(f'- {dataset}: {NAMES[method]} ends within {100 * worst:.2f} points of density of every '
                        f'target ({"met" if worst <= 0.01 else "NOT met"}; the bar is 1 point).')
    for method in ('dessilbi', 'dessilbi_finetune'):
      for t in [*targets, *([extra] if extra else [])]:
        d, l0 = by.get((method, t)), by.get(('l0', t))
        if d and l0:
          gap = 100 * (d['acc'][0] - l0['acc'][0])
          verdicts.append(f'- {dataset}, ε = {100 * t:g} %: {NAMES[method]} {_pm(d["acc"])} vs L0 constrained '
                          f'{_pm(l0["acc"])}: {"met" if gap >= 0 else "NOT met"} ({gap:+.1f} points).')
    for r in mine:
      if r['method'] == 'l0_penalty':
        verdicts.append(f'- {dataset}: L0 penalized with λ = {r["value"]:g} lands at {_pm(r["density"])} % '
                        f'(seeds: {", ".join(f"{100 * d:.1f}" for d in r["per_seed_density"])}).')
  return lines, verdicts


def run(datasets=('digits', 'mnist1d'), seeds: int = 3, targets=TARGETS, extra=None, methods=METHODS,
        penalties=PENALTIES, name: str = 'controlled_sparsity') -> str:
  start = time.perf_counter()
  points = []
  values = lambda method: penalties if method == 'l0_penalty' else [*targets, *([extra] if extra else [])]
  for dataset in datasets:
    for seed in range(seeds):
      for method in methods:
        for value in values(method):
          points.append(measure(dataset, method, value, seed))
      print(f'{dataset} seed {seed} done ({time.perf_counter() - start:.0f} s)', flush=True)
  rows = aggregate(points)
  lines, verdicts = report(rows, targets, extra)
  text = '\n'.join([
      '# Controlled sparsity', '',
      f'Machine: {machine()}. {(time.perf_counter() - start) / 60:.1f} minutes in all. Regenerate with '
      f'`python -m benchmarks.controlled_sparsity --datasets {" ".join(datasets)} --seeds {seeds} --targets '
      f'{" ".join(f"{t:g}" for t in targets)}{f" --extra-density {extra:g}" if extra else ""} --methods '
      f'{" ".join(methods)}{" --penalties " + " ".join(f"{p:g}" for p in penalties) if "l0_penalty" in methods else ""}'
      f'{f" --name {name}" if name != "controlled_sparsity" else ""}`.', '',
      'Density: the fraction of the structured weights (conv and dense kernels) the network keeps: for DessiLBI '
      'the support of Γ at the end (the accuracy is that of W ⊙ 1[Γ≠0]), for L0 the expected density of the '
      'gates (the accuracy is the purged network\'s), for GMP the non-zero weights. Params and MACs (per '
      'example): the network with its dead units removed (DessiLBI, GMP: `dessilbi compact`; L0: purged). '
      'Every run uses the dataset\'s preset (`dessilbi_jax.train.PRESETS`): the same epochs, batch and '
      'learning-rate schedule.', '',
      '## The bars', '', *verdicts, '', *lines])
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f'{name}.md').write_text(text + '\n')
  (RESULTS / f'{name}.json').write_text(json.dumps({'points': points}, indent=1) + '\n')
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', nargs='+', default=['digits', 'mnist1d'])
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--targets', type=float, nargs='+', default=list(TARGETS))
  parser.add_argument('--extra-density', type=float, default=None,
                      help='one more target density, picked when you run it (e.g. 0.37)')
  parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
  parser.add_argument('--penalties', type=float, nargs='+', default=list(PENALTIES))
  parser.add_argument('--name', default='controlled_sparsity', help='results/NAME.md and .json')
  args = parser.parse_args(argv)
  for t in [*args.targets, *([args.extra_density] if args.extra_density is not None else [])]:
    if not 0 < t <= 1:
      parser.error(f'densities must be in (0, 1], got {t}.')
  if args.seeds < 1:
    parser.error(f'--seeds must be >= 1, got {args.seeds}.')
  with tempfile.TemporaryDirectory(prefix='dessilbi-jax-cache-') as cache:
    use_compilation_cache(cache)
    print(run(args.datasets, args.seeds, tuple(args.targets), args.extra_density, tuple(args.methods),
              tuple(args.penalties), args.name))


if __name__ == '__main__':
  main()
