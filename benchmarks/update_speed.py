"""Speed of the jitted DessiLBI update against SGD-momentum on real parameter shapes.

Times ``tx.update`` + ``optax.apply_updates`` under one ``jax.jit`` with params
and optimizer state donated, for the parameter trees of VGG-16 (CIFAR, about
14.7 M parameters) and ResNet-56 (about 0.85 M), with ``dl.dessilbi`` (default
grouping: conv kernels by filter) and ``optax.sgd(lr, momentum=0.9)`` on the
same shapes, interleaved in one run. Prints the ratio of the median times, the
optimizer-state bytes per parameter and the copies XLA left in the compiled
update (0 means every buffer is updated in place). With
``--compare-without-edges`` a third runner times the same update with its
ordering edges taken out (``ordering_edges=False``), the straightforward jitted
version, to show what the edges buy (a third runner perturbs the other two a
little, so the main table is measured without it).

The whole measurement (fresh buffers, compile, interleaved rounds) is done
``--runs`` times per shape; the table shows the run with the median ratio and
the range over all runs, since the machine's memory traffic moves the ratio.
Each run then also times each optimizer alone (``--repeats`` calls in a row),
the other way to take the ratio; its median and range over the runs are shown.

With ``--target-density ε`` it measures instead what steering λ to a density
costs (``dl.dessilbi(target_density=...)``, :mod:`dessilbi_jax.core.target_density`):
the plain DessiLBI update against the same update with a target, interleaved,
for the budget cap recomputed every ``--target-every`` steps (1 and 10 by
default) and for dual ascent; written to ``results/update_speed_target.md``.

With ``--lean`` it times the lean state (``dl.dessilbi(store_gamma=False)``:
no Γ in the state, rebuilt from Z) interleaved against SGD-momentum and the
plain DessiLBI update, with each one's optimizer-state bytes per parameter and
the copies of arrays XLA left in its compiled update; written to
``results/update_speed_lean.md``.

Run::

  python -m benchmarks.update_speed [--repeats 40] [--runs 5] [--models vgg16 resnet56]
  python -m benchmarks.update_speed --target-density 0.3
  python -m benchmarks.update_speed --lean [--runs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl
from dessilbi_jax import models
from dessilbi_jax.core import target_density as targets
from benchmarks.common import machine
from benchmarks.common import write_result

def param_tree(model_name: str):
  """Random params (and gradients) with the shapes of ``model_name`` on CIFAR-10."""
  model = models.get_model(model_name, 10, (32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), 2 * len(leaves))
  params = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys[::2], leaves)]
  grads = [0.01 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys[1::2], leaves)]
  return treedef.unflatten(params), treedef.unflatten(grads)


class Runner:
  """One optimizer's jitted, donated update on its own copy of the params."""

  def __init__(self, tx, params, grads):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.grads = jax.tree.map(jnp.copy, grads)   # its own copy: no runner reads what another left in cache
    self.carry = (jax.tree.map(jnp.copy, params), tx.init(params))
    compiled = self.step.lower(*self.carry, grads).compile()
    hlo = compiled.as_text()
    entry = hlo[hlo.index('ENTRY'):]
    self.copies = entry.count(' copy(')
    self.array_copies = len(re.findall(r'= \w+\[[^\]]+\]\S* copy\(', entry))   # of buffers, not scalars
    self.fusions = entry.count(' fusion(')   # kernels launched per step
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.carry[1]))
    self.state_bytes_per_param = state_bytes / sum(x.size for x in jax.tree.leaves(params))
    try:   # the update's temporaries (XLA's copies among them), allocated on every call
      temp = compiled.memory_analysis().temp_size_in_bytes
    except (AttributeError, NotImplementedError):
      temp = float('nan')
    self.temp_bytes_per_param = temp / sum(x.size for x in jax.tree.leaves(params))
    for _ in range(3):
      self()
    self.times = []

  def __call__(self):
    self.carry = self.step(*self.carry, self.grads)
    jax.block_until_ready(self.carry)

  def timed(self):
    start = time.perf_counter()
    self()
    self.times.append(time.perf_counter() - start)


def measure(model_name: str, repeats: int, compare_without_edges: bool = False) -> dict:
  params, grads = param_tree(model_name)
  runners = {
      'dessilbi': Runner(dl.dessilbi(0.1), params, grads),
      'sgd': Runner(optax.sgd(0.1, momentum=0.9), params, grads),
  }
  if compare_without_edges:
    runners['no_edges'] = Runner(dl.dessilbi(0.1, ordering_edges=False), params, grads)
  for _ in range(repeats):   # interleaved, so a busy moment of the machine hits both
    for runner in runners.values():
      runner.timed()
  median = {name: statistics.median(r.times) for name, r in runners.items()}
  # Ratios of the calls of one round, then their median: slow drifts of the machine cancel.
  paired = lambda name: statistics.median(a / b for a, b in zip(runners[name].times, runners['sgd'].times))
  row = dict(
      model=model_name,
      params=sum(x.size for x in jax.tree.leaves(params)),
      dessilbi_ms=1e3 * median['dessilbi'],
      sgd_ms=1e3 * median['sgd'],
      ratio=paired('dessilbi'),
      dessilbi_state_bytes=runners['dessilbi'].state_bytes_per_param,
      sgd_state_bytes=runners['sgd'].state_bytes_per_param,
      dessilbi_copies=runners['dessilbi'].copies,
      dessilbi_fusions=runners['dessilbi'].fusions,
      sgd_fusions=runners['sgd'].fusions,
  )
  if compare_without_edges:
    row.update(no_edges_ratio=paired('no_edges'), no_edges_copies=runners['no_edges'].copies)
  # Then each optimizer alone, `repeats` calls in a row: the machine in another state (the memory
  # traffic of the other optimizer's buffers gone), which moves the ratio.
  alone = {}
  for name in ('dessilbi', 'sgd'):
    runners[name].times = []
    for _ in range(repeats):
      runners[name].timed()
    alone[name] = statistics.median(runners[name].times)
  row.update(ratio_alone=alone['dessilbi'] / alone['sgd'])
  return row


def measure_target(model_name: str, repeats: int, density: float, everys) -> dict:
  """Per-step cost of ``target_density``: each target's update over the plain DessiLBI update, interleaved."""
  params, grads = param_tree(model_name)
  variants = {f'budget, every {n}': targets.Target(density, every=n) for n in everys}
  variants['dual'] = targets.Target(density, method='dual')
  runners = {'plain': Runner(dl.dessilbi(0.1), params, grads)}
  runners.update({name: Runner(dl.dessilbi(0.1, target_density=t), params, grads) for name, t in variants.items()})
  for _ in range(repeats):
    for runner in runners.values():
      runner.timed()
  paired = lambda name: statistics.median(a / b for a, b in zip(runners[name].times, runners['plain'].times))
  return dict(model=model_name, plain_ms=1e3 * statistics.median(runners['plain'].times),
              **{name: paired(name) for name in variants}, copies=max(r.array_copies for r in runners.values()))


def measure_lean(model_name: str, repeats: int) -> dict:
  """The lean state's update against SGD-momentum and the stored DessiLBI update, interleaved."""
  params, grads = param_tree(model_name)
  runners = {'sgd': Runner(optax.sgd(0.1, momentum=0.9), params, grads),
             'dessilbi': Runner(dl.dessilbi(0.1), params, grads),
             'lean': Runner(dl.dessilbi(0.1, store_gamma=False), params, grads)}
  for _ in range(repeats):
    for runner in runners.values():
      runner.timed()
  paired = lambda a, b: statistics.median(x / y for x, y in zip(runners[a].times, runners[b].times))
  return dict(model=model_name, params=sum(x.size for x in jax.tree.leaves(params)),
              **{f'{n}_ms': 1e3 * statistics.median(r.times) for n, r in runners.items()},
              **{f'{n}_bytes': r.state_bytes_per_param for n, r in runners.items()},
              **{f'{n}_copies': r.array_copies for n, r in runners.items()},
              **{f'{n}_temp': r.temp_bytes_per_param for n, r in runners.items()},
              lean_sgd=paired('lean', 'sgd'), dessilbi_sgd=paired('dessilbi', 'sgd'),
              lean_dessilbi=paired('lean', 'dessilbi'))


def lean_table(rows: list[dict]) -> str:
  """Per shape: the run with the median lean/SGD ratio, and the range of each ratio over the runs."""
  lines = ['| parameter shapes | params | SGD-momentum | DessiLBI | lean DessiLBI | lean / SGD | DessiLBI / SGD '
           '| lean / DessiLBI | state bytes / param (SGD, DessiLBI, lean) | temporaries, bytes / param (DessiLBI, lean) '
           '| copies of arrays (DessiLBI, lean) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for model in dict.fromkeys(r['model'] for r in rows):
    mine = sorted((r for r in rows if r['model'] == model), key=lambda r: r['lean_sgd'])
    r = mine[(len(mine) - 1) // 2]
    cell = lambda key: (f"**{r[key]:.2f}**" + (f" ({min(x[key] for x in mine):.2f}–{max(x[key] for x in mine):.2f})"
                                              if len(mine) > 1 else ''))
    lines.append(f"| {model} | {r['params'] / 1e6:.2f} M | {r['sgd_ms']:.2f} ms | {r['dessilbi_ms']:.2f} ms | "
                 f"{r['lean_ms']:.2f} ms | {cell('lean_sgd')} | {cell('dessilbi_sgd')} | {cell('lean_dessilbi')} | "
                 f"{r['sgd_bytes']:.2f}, {r['dessilbi_bytes']:.2f}, {r['lean_bytes']:.2f} | "
                 f"{r['dessilbi_temp']:.2f}, {r['lean_temp']:.2f} | "
                 f"{r['dessilbi_copies']}, {r['lean_copies']} |")
  return '\n'.join(lines)


def target_table(rows: list[dict], runs: int) -> str:
  names = [k for k in rows[0] if k.startswith('budget') or k == 'dual']
  lines = ['| parameter shapes | plain DessiLBI update | ' + ' | '.join(f'{n}: time / plain' for n in names)
           + ' | copies of arrays in any HLO |', '|---|---:|' + '---:|' * len(names) + '---:|']
  for model in dict.fromkeys(r['model'] for r in rows):
    mine = [r for r in rows if r['model'] == model]
    cells = []
    for n in names:
      values = sorted(r[n] for r in mine)
      cells.append(f'**{values[(len(values) - 1) // 2]:.3f}** ({values[0]:.3f}–{values[-1]:.3f})')
    plain = statistics.median(r['plain_ms'] for r in mine)
    lines.append(f'| {model} | {plain:.2f} ms | ' + ' | '.join(cells) + f" | {mine[0]['copies']} |")
  return '\n'.join(lines)


def measure_runs(model_name: str, repeats: int, runs: int, compare_without_edges: bool = False) -> dict:
  """``measure`` ``runs`` times: the run with the median ratio, plus the ratios' range."""
  rows = sorted((measure(model_name, repeats, compare_without_edges) for _ in range(runs)), key=lambda r: r['ratio'])
  alone = sorted(r['ratio_alone'] for r in rows)
  return dict(rows[(len(rows) - 1) // 2], ratio_min=rows[0]['ratio'], ratio_max=rows[-1]['ratio'],
              sgd_ms_min=min(r['sgd_ms'] for r in rows), sgd_ms_max=max(r['sgd_ms'] for r in rows), runs=runs,
              alone_min=alone[0], alone_median=alone[(len(alone) - 1) // 2], alone_max=alone[-1])


def table(rows: list[dict]) -> str:
  compare = 'no_edges_ratio' in rows[0]
  header = ('| parameter shapes | params | DessiLBI update | SGD-momentum update | ratio | ratio over runs (SGD step) '
            '| each timed alone: ratio over runs | state bytes / param (DessiLBI, SGD) | copies in DessiLBI HLO '
            '| fusions (DessiLBI, SGD) |')
  lines = [header + (' without ordering edges: ratio (copies) |' if compare else ''),
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if compare else '')]
  for r in rows:
    spread = (f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} in {r['runs']} runs "
              f"({r['sgd_ms_min']:.1f}–{r['sgd_ms_max']:.1f} ms)")
    alone = f"{r['alone_median']:.2f} ({r['alone_min']:.2f}–{r['alone_max']:.2f})"
    line = (f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['dessilbi_ms']:.2f} ms | {r['sgd_ms']:.2f} ms | "
            f"**{r['ratio']:.2f}** | {spread} | {alone} | {r['dessilbi_state_bytes']:.1f}, {r['sgd_state_bytes']:.1f} | "
            f"{r['dessilbi_copies']} | {r['dessilbi_fusions']}, {r['sgd_fusions']} |")
    lines.append(line + (f" {r['no_edges_ratio']:.2f} ({r['no_edges_copies']}) |" if compare else ''))
  return '\n'.join(lines)


def _publish(text: str, name: str, title: str, write: bool) -> None:
  """Prints a result and (unless ``--no-write``) writes it to ``results/<name>.md``."""
  print(text)
  if write:
    write_result(name, title, text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', nargs='+', default=['vgg16', 'resnet56'])
  parser.add_argument('--repeats', type=int, default=40)
  parser.add_argument('--runs', type=int, default=5, help='whole measurements per shape (fresh buffers each)')
  parser.add_argument('--compare-without-edges', action='store_true',
                      help='also time the update without its ordering edges (implies --no-write)')
  parser.add_argument('--no-write', action='store_true', help='print only; do not write benchmarks/results/')
  parser.add_argument('--target-density', type=float, default=None,
                      help='measure the per-step cost of dl.dessilbi(target_density=...) instead')
  parser.add_argument('--target-every', type=int, nargs='+', default=[1, 10])
  parser.add_argument('--lean', action='store_true',
                      help='time the lean state (store_gamma=False) against SGD-momentum and DessiLBI instead')
  args = parser.parse_args(argv)
  if args.lean:
    rows = [measure_lean(name, args.repeats) for name in args.models for _ in range(args.runs)]
    text = (f'The lean state (dl.dessilbi(store_gamma=False), no Γ in the state) against SGD-momentum and the '
            f'plain DessiLBI update: jitted update + optax.apply_updates, params and state donated, '
            f'{args.repeats} interleaved rounds; times are medians, ratios the median of the per-round ratios; '
            f'the run with the median lean / SGD ratio of {args.runs}, with the range over all of them.'
            f'\n\nMachine: {machine()}.\n\n{lean_table(rows)}\n')
    return _publish(text, 'update_speed_lean', 'Update speed: the lean state', not args.no_write)
  if args.target_density is not None:
    rows = [measure_target(name, args.repeats, args.target_density, args.target_every)
            for name in args.models for _ in range(args.runs)]
    text = (f'Per-step cost of steering λ to a target density of {args.target_density}: the jitted, donated '
            f'update with the target over the plain DessiLBI update, {args.repeats} interleaved rounds, median of '
            f'the per-round ratios; median and range over {args.runs} runs.\n\nMachine: {machine()}.\n\n'
            f'{target_table(rows, args.runs)}\n')
    return _publish(text, 'update_speed_target', 'Update speed: the cost of a target density', not args.no_write)
  rows = [measure_runs(name, args.repeats, args.runs, args.compare_without_edges) for name in args.models]
  text = (f'Jitted update + optax.apply_updates, params and state donated; {args.repeats} interleaved rounds '
          f'of one call each; times are medians, ratios the median of the per-round ratios; the run with the '
          f'median ratio of {args.runs} is shown, with the range over all of them. "Each timed alone": '
          f'{args.repeats} calls of one optimizer in a row, then of the other, in every run.'
          f'\n\nMachine: {machine()}.\n\n{table(rows)}\n')
  print(text)
  if not (args.no_write or args.compare_without_edges):
    write_result('update_speed', 'Update speed: DessiLBI vs SGD-momentum', text)


if __name__ == '__main__':
  main()
