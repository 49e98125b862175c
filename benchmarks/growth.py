"""Growth against fixed widths, on the offline datasets (docs/GROWTH.md, "Does it pay?").

Per dataset and seed, the same total epochs for every network:

* **grown**: ``dessilbi grow`` from the growth preset's narrow widths;
* **reference**: the reference widths trained with DessiLBI (``dessilbi train``'s preset);
* **grown widths from scratch**: the grown run's final widths, trained with DessiLBI from the start;
* **uniform**: the reference widths scaled by one factor to about the grown network's MACs;
* **grown, reset state**: growth as the official code does it (optimizer state restarted,
  new fan-out random; ``--reset-state``).

Reports the final dense test accuracy (mean ± std over seeds), params and MACs (one example).
The bar (issue 12): the grown network within 1 point of the reference's accuracy with at most
half its MACs, on both datasets. Run::

  python -m benchmarks.growth [--seeds 0 1 2] [--datasets digits mnist1d]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from benchmarks.common import machine
from benchmarks.common import write_result
from dessilbi_jax import growth
from dessilbi_jax import models
from dessilbi_jax import train


def _size(cfg: train.TrainConfig, widths) -> tuple[int, int]:
  model, info = train.build_model(cfg, widths)
  import jax
  import jax.numpy as jnp
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *info.input_shape)))
  return models.count_params(variables['params']), models.count_flops(model, info.input_shape)


def _uniform_widths(cfg, reference, target_macs):
  """The reference widths times the one factor whose network's MACs come closest to ``target_macs``."""
  best = None
  for step in range(5, 201):
    f = step / 100
    widths = tuple(max(1, round(f * w)) for w in reference)
    macs = _size(cfg, widths)[1]
    if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
      best = (widths, macs)
  return best[0]


def run(dataset: str, seed: int) -> dict[str, dict]:
  grow_cfg, settings = growth.grow_preset(dataset, seed=seed)
  out = {}
  start = time.perf_counter()
  grown = growth.grow(grow_cfg, settings, quiet=True)
  out['grown'] = (grown.history[-1]['dense_test_acc'], grown.widths, time.perf_counter() - start)
  reset = growth.grow(grow_cfg, settings, reset_state=True, quiet=True)
  out['grown, reset state'] = (reset.history[-1]['dense_test_acc'], reset.widths, None)
  ref_cfg = train.preset(dataset, seed=seed)
  reference_widths = tuple(train.build_model(ref_cfg)[0].widths)
  for name, widths in (('reference', reference_widths), ('grown widths from scratch', grown.widths),
                       ('uniform', _uniform_widths(ref_cfg, reference_widths, _size(ref_cfg, grown.widths)[1]))):
    start = time.perf_counter()
    result = train.fit(dataclasses.replace(ref_cfg, widths=widths), quiet=True)
    out[name] = (result.history[-1]['dense_test_acc'], widths, time.perf_counter() - start)
  return {name: {'acc': acc, 'widths': widths, 'seconds': seconds,
                 **dict(zip(('params', 'macs'), _size(ref_cfg, widths)))}
          for name, (acc, widths, seconds) in out.items()}


ORDER = ('grown', 'reference', 'grown widths from scratch', 'uniform', 'grown, reset state')


def table(dataset: str, runs: list[dict]) -> str:
  ref_macs = statistics.mean(r['reference']['macs'] for r in runs)
  lines = [f'**{dataset}** ({len(runs)} seeds; widths of seed 0)\n',
           '| network | dense test acc | params | MACs | MACs / reference | widths |', '|---|---:|---:|---:|---:|---|']
  for name in ORDER:
    accs = [100 * r[name]['acc'] for r in runs]
    spread = f' ± {statistics.stdev(accs):.1f}' if len(accs) > 1 else ''
    params = statistics.mean(r[name]['params'] for r in runs)
    macs = statistics.mean(r[name]['macs'] for r in runs)
    lines.append(f'| {name} | {statistics.mean(accs):.1f}{spread} % | {params:,.0f} | {macs:,.0f} | '
                 f'{macs / ref_macs:.2f} | {" ".join(map(str, runs[0][name]["widths"]))} |')
  gap = statistics.mean(100 * (r['reference']['acc'] - r['grown']['acc']) for r in runs)
  ratio = statistics.mean(r['grown']['macs'] for r in runs) / ref_macs
  met = gap <= 1 and ratio <= 0.5
  lines.append(f'\nGrown vs reference: {gap:+.1f} points below, {ratio:.2f} of its MACs: bar (≤ 1 point, '
               f'≤ 0.5 of the MACs) {"met" if met else "NOT met"}.\n')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--datasets', nargs='+', default=['digits', 'mnist1d'])
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  tables = [table(d, [run(d, s) for s in args.seeds]) for d in args.datasets]
  text = (f'Machine: {machine()}. Every network trains the same total epochs with DessiLBI (the dataset\'s '
          f'preset); accuracy is the dense W\'s at the end. {time.perf_counter() - start:.0f} s in all.\n\n'
          + '\n'.join(tables))
  print(text)
  if not args.no_write:
    write_result('growth', 'Growth against fixed widths', text)


if __name__ == '__main__':
  main()
