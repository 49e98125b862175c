"""Regenerates every table and plot in ``benchmarks/results/``.

Run::

  python -m benchmarks.run_all            # full: about 10 minutes on 2 CPU cores
  python -m benchmarks.run_all --quick    # under 10 minutes on 2 CPU cores
  python -m benchmarks.run_all --skip update_speed   # leave results/update_speed.md as it is

``benchmarks/update_speed.py`` (the optimizer step alone) runs too when present;
its timings want a quiet machine, so skip it when other work shares the cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

from benchmarks import input_pipeline
from benchmarks import main_job
from benchmarks import sparsity_vs_accuracy
from benchmarks import train_throughput

BENCHMARKS = ('update_speed', 'train_throughput', 'input_pipeline', 'main_job', 'sparsity_vs_accuracy')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='the short version of every benchmark')
  parser.add_argument('--skip', nargs='+', default=[], choices=BENCHMARKS, metavar='NAME',
                      help=f'benchmarks not to run (their results stay as they are): {", ".join(BENCHMARKS)}')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if 'update_speed' not in args.skip and importlib.util.find_spec('benchmarks.update_speed') is not None:
    from benchmarks import update_speed
    update_speed.main(['--repeats', '10', '--runs', '1'] if args.quick else [])
  if 'train_throughput' not in args.skip:
    train_throughput.main(['--quick'] if args.quick else [])
  if 'input_pipeline' not in args.skip:
    input_pipeline.main(['--batches', '500'] if args.quick else [])
  if 'main_job' not in args.skip:
    main_job.main([])
  if 'sparsity_vs_accuracy' not in args.skip:
    with tempfile.TemporaryDirectory(prefix='dessilbi-jax-cache-') as cache:
      sparsity_vs_accuracy.use_compilation_cache(cache)
      print(sparsity_vs_accuracy.run(quick=args.quick))
  print(f'run_all{" --quick" if args.quick else ""}: {(time.perf_counter() - start) / 60:.1f} minutes; '
        f'results in {sparsity_vs_accuracy.RESULTS}')


if __name__ == '__main__':
  main()
