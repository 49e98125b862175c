"""The zoo's transformers with half their heads and half their MLP neurons removed: exactness and speed.

For the ViT on 8 x 8 digits and the byte-level decoder on 64-byte windows
(the zoo defaults: width 64, 4 blocks of 4 heads of 16, MLP 256), every 2nd
head and every 2nd MLP neuron of every block is removed with
:func:`dessilbi_jax.structure.remove` (the residual stream, kept whole by the
LayerNorms, stays). Reported: the max absolute difference between the compact
network's logits and the masked network's (``structure.zero``; the bar is
1e-5 in float32), and eval-mode inference of dense against compact, median of
``--repeats`` interleaved calls of the jitted forward pass at batch 1 and 64,
with the MACs ratio (``models.count_flops``: the projections and MLPs;
attention's products of two activations are not counted) beside it.

Run::

  python -m benchmarks.transformers [--repeats 20] [--batches 1 64]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine
from benchmarks.common import write_result
from benchmarks.inference_speed import timed
from dessilbi_jax import models
from dessilbi_jax import structure

CASES = {'vit': (10, (8, 8, 1)), 'gpt': (256, (64,))}


def halved(name: str):
  """(dense model, variables, compact model, variables, input shape, max |compact − masked|)."""
  classes, shape = CASES[name]
  model = models.get_model(name, classes, shape)
  x = jnp.asarray(np.random.default_rng(0).integers(0, classes, (8, *shape)) if name == 'gpt'
                  else np.random.default_rng(0).normal(size=(8, *shape)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  keep = {g.name: np.arange(g.size) % 2 == 0 for g in unit_map.prunable()}
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  masked = structure.zero(variables, unit_map, keep)
  diff = float(jnp.max(jnp.abs(jax.jit(small.apply)(small_vars, x) - jax.jit(model.apply)(masked, x))))
  return model, variables, small, small_vars, shape, diff


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--batches', nargs='+', type=int, default=[1, 64])
  args = parser.parse_args()
  load_before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  rows = []
  for name in CASES:
    model, variables, small, small_vars, shape, diff = halved(name)
    macs = models.count_flops(model, shape) / models.count_flops(small, shape)
    for batch in args.batches:
      dense, compact = timed(model, variables, batch, shape), timed(small, small_vars, batch, shape)
      dense_times, compact_times = [], []
      for _ in range(args.repeats):  # interleaved, so load changes hit both
        dense_times.append(dense())
        compact_times.append(compact())
      d, c = statistics.median(dense_times), statistics.median(compact_times)
      rows.append((name, small.block_heads, small.widths, diff, batch, 1e3 * d, 1e3 * c, d / c, macs))
      print(f'{name} batch {batch}: dense {1e3 * d:.3f} ms, compact {1e3 * c:.3f} ms, speed-up {d / c:.2f}x, '
            f'MACs ratio {macs:.2f}x, max |compact - masked| {diff:.2g}', flush=True)
  load_after = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  lines = ['| model | compact heads / MLP per block | max abs(compact − masked) | batch | dense ms | compact ms | '
           'speed-up | MACs ratio | speed-up / MACs ratio |', '|---|---|---|---|---|---|---|---|---|']
  lines += [f'| {n} | {h} / {w} | {e:.2g} | {b} | {d:.3g} | {c:.3g} | {s:.2f}x | {m:.2f}x | {s / m:.2f} |'
            for n, h, w, e, b, d, c, s, m in rows]
  text = (f'Machine: {machine()}.\n\nLoad: before `{load_before}`; after `{load_after}` (a shared machine, '
          'heavily loaded: the times are noisy).\n\nUntrained networks (initialization): exactness and speed do '
          'not depend on training. Every 2nd head and MLP neuron of every block removed; the residual stream '
          'kept.\n\n' + '\n'.join(lines) + '\n')
  command = 'python -m benchmarks.transformers ' + ' '.join(sys.argv[1:])
  print(write_result('transformers', 'Transformers: half the heads and MLP neurons removed', text, command.strip()))


if __name__ == '__main__':
  main()
