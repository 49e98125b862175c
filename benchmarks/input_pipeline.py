"""Per-batch overhead of the input pipeline against grain on the offline datasets.

The training loop pulls one batch per step, and a small model steps in about a
millisecond, so the input pipeline must stay far below that. Times
``data.train_batches`` (numpy indexing of the split held in memory, the shuffle
drawn from (seed, epoch)) against grain's ``MapDataset`` doing the same
shuffle and batching over the same arrays, in one run. Run::

  python -m benchmarks.input_pipeline [--batches 2000]
"""

from __future__ import annotations

import argparse
import itertools
import time


from dessilbi_jax import data
from benchmarks.common import machine
from benchmarks.common import write_result

def per_batch_us(batches, n: int) -> float:
  next(batches)   # first batch: loading, not overhead
  start = time.perf_counter()
  for batch in itertools.islice(batches, n):
    pass
  return 1e6 * (time.perf_counter() - start) / n


def grain_batches(name: str, batch_size: int, seed: int):
  import grain
  x, y = data.load_arrays(name, 'train')
  source = [{'image': x[i], 'label': y[i]} for i in range(len(x))]
  dataset = grain.MapDataset.source(source).shuffle(seed=seed).batch(batch_size, drop_remainder=True).repeat()
  return iter(dataset)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=2000)
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  rows = []
  for name, batch_size in (('digits', 64), ('digits', 128), ('mnist1d', 64)):
    ours = per_batch_us(data.train_batches(name, batch_size, seed=0, num_devices=1), args.batches)
    theirs = per_batch_us(grain_batches(name, batch_size, seed=0), args.batches // 10)
    rows.append(f'| {name} | {batch_size} | {ours:,.0f} µs | {theirs:,.0f} µs | {theirs / ours:,.0f}× |')
  text = (f'Machine: {machine()}.\n\n| dataset | batch | `data.train_batches` | grain `MapDataset` | grain / ours |\n'
          '|---|---:|---:|---:|---:|\n' + '\n'.join(rows) + '\n')
  print(text)
  if not args.no_write:
    write_result('input_pipeline', 'Input pipeline: time per training batch', text)


if __name__ == '__main__':
  main()
