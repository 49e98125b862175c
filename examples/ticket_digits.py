"""Winning tickets on digits, step by step (about a minute on two CPU cores).

1. Train LeNet-5 with DessiLBI (the defaults of ``dessilbi train``) and watch
   the support of Γ grow: the regularization path.
2. Take the support of Γ at several epochs along the path, and retrain only
   that support with SGD-momentum from the run's own initialization (rewind;
   and once from a fresh one, reinit): the winning tickets.
3. Compare with the dense network trained by SGD-momentum for as long.

::

  python examples/ticket_digits.py --out runs/ticket-digits

The same with the command line: ``dessilbi train --out DIR`` then
``dessilbi ticket --run DIR --epoch E [--init reinit]``.
"""

import argparse
import dataclasses
import pathlib

from dessilbi_jax import train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='runs/ticket-digits', help='a new directory for the runs')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  cfg = train.preset('digits', seed=args.seed)

  print('1. DessiLBI: the path of Γ')
  run = train.fit(cfg, out / 'dessilbi', quiet=True)
  layers = [name for name, row in run.history[-1]['per_leaf'].items() if row['kind']]
  print('epoch  dense  sparse  ' + '  '.join(f'{name.split("/")[0]:>9}' for name in layers))
  for h in run.history:
    kept = [h['per_leaf'][name]['groups_in_support'] / h['per_leaf'][name]['groups'] for name in layers]
    print(f'{h["epoch"]:5d}  {h["dense_test_acc"]:.3f}  {h["sparse_test_acc"]:.3f}   '
          + '  '.join(f'{k:9.1%}' for k in kept))

  print('\n2. Retraining supports of Γ with SGD-momentum')
  epochs = [e for e in (10, 20, 30, 40, cfg.epochs) if e <= cfg.epochs]
  tickets = [train.retrain_ticket(out / 'dessilbi', e, quiet=True) for e in epochs]
  tickets.append(train.retrain_ticket(out / 'dessilbi', 30, init='reinit', quiet=True))

  print('\n3. The dense network with SGD-momentum, same budget')
  sgd = train.fit(dataclasses.replace(cfg, optimizer='sgd'), out / 'sgd', quiet=True)

  first = tickets[0]
  print(f'\n{"network":32s} {"test acc":>8s} {"params":>8s} {"MACs":>8s}')
  print(f'{"dense, SGD-momentum":32s} {sgd.history[-1]["dense_test_acc"]:8.3f} {first["params"]:8,d} '
        f'{first["dense_flops"]:8,d}')
  print(f'{"dense W, DessiLBI":32s} {run.history[-1]["dense_test_acc"]:8.3f} {first["params"]:8,d} '
        f'{first["dense_flops"]:8,d}')
  for t in tickets:
    name = f'support of epoch {t["epoch"]}, {t["init"]}'
    print(f'{name:32s} {t["test_acc"]:8.3f} {t["params_kept"]:8,d} {t["flops"]:8,d}'
          f'   (before retraining: {t["run_sparse_test_acc"]:.3f})')


if __name__ == '__main__':
  main()
