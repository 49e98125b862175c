"""Growth against fixed widths, on the offline datasets (docs/GROWTH.md, "Does it pay?").

Per dataset and seed, the same total epochs for every network:

* **grown**: ``dessilbi grow`` from the growth preset's narrow widths;
* **grown, budget**: the same with ``--target-macs`` (``--budget``, default ½ of the reference's MACs);
* **reference**: the reference widths trained with DessiLBI (``dessilbi train``'s preset);
* **grown widths from scratch**: the grown run's final widths, trained with DessiLBI from the start;
* **uniform**: the reference widths scaled by one factor to about the grown network's MACs;
* **grown, reset state**: growth as the official code does it (optimizer state restarted,
  new fan-out random; ``--reset-state``).

Reports the final dense test accuracy (mean ± std over seeds), params and MACs (one example), the
training compute (multiply-accumulates over the run: 3 × forward MACs per training example seen,
forward plus a backward of twice its cost, summed over the epochs at the widths each trained at;
:func:`dessilbi_jax.growth.training_macs`) and the wall time of each run (compilation and evaluation
included). The bar (issue 12): the grown network within 1 point of the reference's accuracy with at
most half its MACs, on both datasets. Run::

  python -m benchmarks.growth [--seeds 0 1 2] [--datasets digits mnist1d] [--budget 0.5]
  python -m benchmarks.growth --smoke   # 3 epochs, checks every epoch, nothing written: that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from benchmarks.common import machine
from benchmarks.common import write_result
from dessilbi_jax import data
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


SMOKE = ({'epochs': 3}, {'grow_every': 1, 'finetune_epochs': 1})


def run(dataset: str, seed: int, budget: float, smoke: bool = False) -> dict[str, dict]:
  train_overrides, rule = SMOKE if smoke else ({}, {})
  grow_cfg, settings = growth.grow_preset(dataset, rule, seed=seed, **train_overrides)
  examples = data.steps_per_epoch(dataset, grow_cfg.batch_size) * grow_cfg.batch_size
  out = {}
  for name, grow_settings, reset_state in (
      ('grown', settings, False),
      ('grown, budget', dataclasses.replace(settings, target_macs=growth.resolve_budget(grow_cfg, budget)), False),
      ('grown, reset state', settings, True)):
    start = time.perf_counter()
    grown = growth.grow(grow_cfg, grow_settings, reset_state=reset_state, quiet=True)
    out[name] = (grown.history[-1]['dense_test_acc'], grown.widths, time.perf_counter() - start,
                 grown.history[-1]['train_macs'])
  ref_cfg = train.preset(dataset, seed=seed, **train_overrides)
  reference_widths = tuple(train.build_model(ref_cfg)[0].widths)
  grown_widths = out['grown'][1]
  for name, widths in (('reference', reference_widths), ('grown widths from scratch', grown_widths),
                       ('uniform', _uniform_widths(ref_cfg, reference_widths, _size(ref_cfg, grown_widths)[1]))):
    start = time.perf_counter()
    result = train.fit(dataclasses.replace(ref_cfg, widths=widths), quiet=True)
    out[name] = (result.history[-1]['dense_test_acc'], widths, time.perf_counter() - start,
                 growth.training_macs(_size(ref_cfg, widths)[1], examples * ref_cfg.epochs))
  return {name: {'acc': acc, 'widths': widths, 'seconds': seconds, 'train_macs': train_macs,
                 **dict(zip(('params', 'macs'), _size(ref_cfg, widths)))}
          for name, (acc, widths, seconds, train_macs) in out.items()}


ORDER = ('grown', 'grown, budget', 'reference', 'grown widths from scratch', 'uniform', 'grown, reset state')


def table(dataset: str, runs: list[dict]) -> str:
  ref_macs = statistics.mean(r['reference']['macs'] for r in runs)
  ref_train = statistics.mean(r['reference']['train_macs'] for r in runs)
  lines = [f'**{dataset}** ({len(runs)} seeds; widths of seed 0)\n',
           '| network | dense test acc | params | MACs | MACs / reference | training MACs | training / reference '
           '| wall time | widths |', '|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for name in ORDER:
    accs = [100 * r[name]['acc'] for r in runs]
    spread = f' ± {statistics.stdev(accs):.1f}' if len(accs) > 1 else ''
    params = statistics.mean(r[name]['params'] for r in runs)
    macs = statistics.mean(r[name]['macs'] for r in runs)
    train_macs = statistics.mean(r[name]['train_macs'] for r in runs)
    seconds = statistics.mean(r[name]['seconds'] for r in runs)
    lines.append(f'| {name} | {statistics.mean(accs):.1f}{spread} % | {params:,.0f} | {macs:,.0f} | '
                 f'{macs / ref_macs:.2f} | {train_macs:.3g} | {train_macs / ref_train:.2f} | {seconds:.0f} s | '
                 f'{" ".join(map(str, runs[0][name]["widths"]))} |')
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
  parser.add_argument('--budget', type=float, default=0.5,
                      help="the 'grown, budget' row's --target-macs (default ½ of the reference's MACs)")
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--smoke', action='store_true',
                      help='3 epochs, a check after every epoch, nothing written: only that the script runs')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  tables = [table(d, [run(d, s, args.budget, args.smoke) for s in args.seeds]) for d in args.datasets]
  text = (f'Machine: {machine()}. Every network trains the same total epochs with DessiLBI (the dataset\'s '
          f'preset); accuracy is the dense W\'s at the end. {time.perf_counter() - start:.0f} s in all.\n\n'
          + '\n'.join(tables))
  print(text)
  if not (args.no_write or args.smoke):
    write_result('growth', 'Growth against fixed widths', text)


if __name__ == '__main__':
  main()
