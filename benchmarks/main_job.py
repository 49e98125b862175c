"""Wall time and outcome of the bare main job, ``dessilbi train``, per preset.

Runs the command a user runs (a subprocess, imports and compilation included)
for each offline dataset's preset, and reports its wall time and the final
dense and sparse test accuracy and the fraction of weights kept, read from the
run's ``metrics.jsonl``. Run::

  python -m benchmarks.main_job
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.common import machine
from benchmarks.common import write_result

def run(dataset: str, out: pathlib.Path) -> str:
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'dessilbi_jax', 'train', '--dataset', dataset, '--out', str(out), '--quiet'],
                 check=True)
  seconds = time.perf_counter() - start
  last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
  return (f"| `dessilbi train --dataset {dataset}` | {seconds:.0f} s | {100 * last['dense_test_acc']:.1f} % | "
          f"{100 * last['sparse_test_acc']:.1f} % | {100 * last['weights_kept']:.1f} % | {100 * last['groups_kept']:.1f} % |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    rows = [run(name, pathlib.Path(tmp) / name) for name in ('digits', 'mnist1d')]
  text = (f'Machine: {machine()}. Seed 0; the datasets already prepared.\n\n'
          '| command | wall time | dense test acc | sparse test acc | weights kept | groups kept |\n'
          '|---|---:|---:|---:|---:|---:|\n' + '\n'.join(rows) + '\n')
  print(text)
  if not args.no_write:
    write_result('main_job', 'The main job', text)


if __name__ == '__main__':
  main()
