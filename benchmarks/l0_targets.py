"""L0 gates at low density targets: where the expected and the purged network's density land.

The real trainer (``train.fit``, ``--optimizer l0 --target-density ε``) on each
dataset's preset, model-wise constraint. Per run: the expected kernel density
of the gates at the end (what the constraint sees), the purged network's kernel
density (median gates, shut units removed: what a user gets), its MACs and
accuracy, and the final multiplier. The bar: both densities within 1 point of ε.

  python -m benchmarks.l0_targets --datasets digits mnist1d --targets 0.05 0.1 0.25 --seeds 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common
from dessilbi_jax import train


def measure(dataset: str, target: float, seed: int, epochs=None) -> dict:
  changes = dict(optimizer='l0', target_density=target, seed=seed)
  if epochs:
    changes['epochs'] = epochs
  cfg = train.preset(dataset, **changes)
  start = time.perf_counter()
  row = train.fit(cfg, quiet=True).history[-1]
  return dict(dataset=dataset, target=target, seed=seed, epochs=cfg.epochs,
              expected=row['expected_density'], purged=row['purged_density'], macs=row['expected_macs'],
              acc=row['purged_test_acc'], multiplier=row['multiplier_max'], seconds=time.perf_counter() - start)


def report(points) -> str:
  lines = ['| dataset | epochs | target ε | seed | expected density | purged density | expected MACs | '
           'purged acc | λ at the end | s |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for p in points:
    lines.append(f'| {p["dataset"]} | {p["epochs"]} | {100 * p["target"]:g} % | {p["seed"]} | '
                 f'{100 * p["expected"]:.2f} % | {100 * p["purged"]:.2f} % | {100 * p["macs"]:.2f} % | '
                 f'{100 * p["acc"]:.1f} % | {p["multiplier"]:.3g} | {p["seconds"]:.0f} |')
  worst_expected = max(abs(p['expected'] - p['target']) for p in points)
  worst_purged = max(abs(p['purged'] - p['target']) for p in points)
  lines += ['', f'- Expected density: worst miss {100 * worst_expected:.2f} points '
                f'({"met" if worst_expected <= 0.01 else "NOT met"}; the bar is 1 point).',
            f'- Purged network\'s density: worst miss {100 * worst_purged:.2f} points '
            f'({"met" if worst_purged <= 0.01 else "NOT met"}; the bar is 1 point).']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', nargs='+', default=['digits', 'mnist1d'])
  parser.add_argument('--targets', nargs='+', type=float, default=[0.05, 0.1, 0.25])
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--epochs', type=int, default=None, help="override the presets' epochs")
  parser.add_argument('--note', default='', help='how loaded the machine was, for the results file')
  args = parser.parse_args(argv)
  points = []
  for dataset in args.datasets:
    for target in args.targets:
      for seed in range(args.seeds):
        points.append(measure(dataset, target, seed, args.epochs))
        print(points[-1], flush=True)
  command = ('python -m benchmarks.l0_targets --datasets ' + ' '.join(args.datasets) + ' --targets ' +
             ' '.join(f'{t:g}' for t in args.targets) + f' --seeds {args.seeds}' +
             (f' --epochs {args.epochs}' if args.epochs else ''))
  text = (f'Machine: {common.machine()}. {args.note}\n\n'
          'Density: the fraction of every conv and dense kernel entry kept (the classifier\'s included). '
          'Expected: under the gates\' distribution at the end (`expected_density`); purged: the network '
          'with median gates folded in and shut units removed (`purged_density`). Model-wise constraint, '
          'each dataset\'s preset, dual restarts, log α clamped to [log 1e-4, log 100].\n\n' + report(points))
  print(common.write_result('l0_targets', 'L0 gates at low density targets', text, command))


if __name__ == '__main__':
  main()
