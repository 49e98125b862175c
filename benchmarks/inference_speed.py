"""Inference wall-clock of dense against removed (compact) networks on this machine.

For VGG-16 and ResNet-56 on 32 x 32 x 3 inputs, keeping 50 % and 25 % of
every prunable group's units (every conv's filters; the residual streams of
ResNet-56 too: every 2nd or 4th unit, so that each stage's part of a stream
keeps that fraction as well), the removed network is built with
:func:`dessilbi_jax.structure.remove` and both are timed in eval mode:
``jax.jit(model.apply)`` compiled once, then ``--repeats`` calls each with
``block_until_ready``, dense and removed interleaved, at batch 1 and 128. The
table gives the median milliseconds, the speed-up (dense / removed) and the
MACs ratio (dense / removed, ``models.count_flops``) beside it, and the
efficiency ``speed-up / MACs ratio`` (Torch-Pruning's ResNet-50 figure is
2.19x wall for 3.85x fewer MACs, 0.57).

Run::

  python -m benchmarks.inference_speed [--repeats 20] [--models vgg16 resnet56] [--batches 1 128]
"""

from __future__ import annotations

import argparse
import sys
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import models
from dessilbi_jax import structure
from benchmarks.common import machine
from benchmarks.common import write_result


def networks(name: str, fraction: float):
  """(dense model, variables, removed model, removed variables)."""
  model = models.get_model(name, 10, (32, 32, 3))
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  keep = {g.name: np.arange(g.size) % round(1 / fraction) == 0 for g in unit_map.prunable()}
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  return model, variables, small, small_vars


def run_networks(dataset: str):
  """(dense model, variables, compact model, variables, input shape) at the end of ``dessilbi train --dataset``."""
  from dessilbi_jax import train
  from dessilbi_jax.train import compact
  cfg = train.preset(dataset)
  result = train.fit(cfg, quiet=True)
  model, info = train.build_model(cfg)
  variables = {'params': result.params, **({'batch_stats': result.batch_stats} if result.batch_stats else {})}
  small, small_vars, _ = compact.compact(model, variables, result.opt_state, info.input_shape)
  return model, variables, small, small_vars, tuple(info.input_shape)


def timed(model, variables, batch: int, input_shape=(32, 32, 3)):
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *input_shape)), jnp.float32)
  fn(variables, x).block_until_ready()

  def once() -> float:
    start = time.perf_counter()
    fn(variables, x).block_until_ready()
    return time.perf_counter() - start
  return once


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--models', nargs='*', default=['vgg16', 'resnet56'])
  parser.add_argument('--fractions', nargs='+', type=float, default=[0.5, 0.25])
  parser.add_argument('--batches', nargs='+', type=int, default=[1, 128])
  parser.add_argument('--runs', nargs='*', default=['digits', 'mnist1d'],
                      help='also the compact networks of these datasets\' default runs at their end')
  parser.add_argument('--name', default='inference_speed', help='results file (benchmarks/results/NAME.md)')
  args = parser.parse_args()
  load_before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  rows = []
  for name in args.models:
    for fraction in args.fractions:
      model, variables, small, small_vars = networks(name, fraction)
      macs = models.count_flops(model, (32, 32, 3)) / models.count_flops(small, (32, 32, 3))
      for batch in args.batches:
        dense, removed = timed(model, variables, batch), timed(small, small_vars, batch)
        dense_times, removed_times = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both
          dense_times.append(dense())
          removed_times.append(removed())
        d, r = statistics.median(dense_times), statistics.median(removed_times)
        rows.append((name, fraction, batch, 1e3 * d, 1e3 * r, d / r, macs))
        print(f'{name} keep {fraction:.0%} batch {batch}: dense {1e3 * d:.2f} ms, removed {1e3 * r:.2f} ms, '
              f'speed-up {d / r:.2f}x, MACs ratio {macs:.2f}x', flush=True)
  for dataset in args.runs:
    model, variables, small, small_vars, shape = run_networks(dataset)
    macs = models.count_flops(model, shape) / models.count_flops(small, shape)
    kept = models.count_params(small_vars['params']) / models.count_params(variables['params'])
    for batch in args.batches:
      dense, removed = timed(model, variables, batch, shape), timed(small, small_vars, batch, shape)
      dense_times, removed_times = [], []
      for _ in range(args.repeats):
        dense_times.append(dense())
        removed_times.append(removed())
      d, r = statistics.median(dense_times), statistics.median(removed_times)
      rows.append((f'{type(model).__name__}, `dessilbi train --dataset {dataset}` at its end', kept, batch,
                   1e3 * d, 1e3 * r, d / r, macs))
      print(f'{dataset} run batch {batch}: dense {1e3 * d:.3f} ms, compact {1e3 * r:.3f} ms, speed-up {d / r:.2f}x, '
            f'MACs ratio {macs:.2f}x', flush=True)
  load_after = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  lines = ['| model | filters kept (runs: params kept) | batch | dense ms | removed ms | speed-up | MACs ratio | speed-up / MACs ratio |',
           '|---|---|---|---|---|---|---|---|']
  lines += [f'| {n} | {f:.0%} | {b} | {d:.3g} | {r:.3g} | {s:.2f}x | {m:.2f}x | {s / m:.2f} |'
            for n, f, b, d, r, s, m in rows]
  text = (f'Machine: {machine()}.\n\nLoad: before `{load_before}`; after `{load_after}` (a shared machine).\n\n'
          f'Median of {args.repeats} interleaved calls of the jitted eval-mode forward pass '
          '(`block_until_ready`); the removed network keeps every 2nd / 4th unit of every prunable group '
          '(`structure.remove`), MACs from `models.count_flops`.\n\n' + '\n'.join(lines) + '\n')
  command = 'python -m benchmarks.inference_speed ' + ' '.join(sys.argv[1:])
  print(write_result(args.name, 'Inference: dense against removed networks', text, command.strip()))


if __name__ == '__main__':
  main()
