"""Training throughput: images/s of one jitted training step (forward, backward, update).

Compares DessiLBI with SGD-momentum and Adam on synthetic batches of the shapes
the papers use, on whatever JAX backend is present, in one run (so the ratios
compare like with like):

* LeNet-5 on digits-sized (8x8x1) and MNIST-sized (28x28x1) batches;
* ResNet-20 on CIFAR-sized (32x32x3) batches (batch norm in training mode).

The step is ``optax`` as a user writes it: loss and gradients of the softmax
cross-entropy, ``tx.update(grads, state, params)``, ``optax.apply_updates``,
all under one ``jax.jit`` with params and state donated. Optimizers are timed
in interleaved rounds and the median round is reported, so a slow moment of
the machine does not land on one optimizer only.

Run::

  python -m benchmarks.train_throughput [--quick] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl
from dessilbi_jax import models
from benchmarks.common import machine
from benchmarks.common import write_result

# (label, model, input shape of one example)
CASES = (
    ('LeNet-5, digits-sized 8x8x1', 'lenet5', (8, 8, 1)),
    ('LeNet-5, MNIST-sized 28x28x1', 'lenet5', (28, 28, 1)),
    ('ResNet-20, CIFAR-sized 32x32x3', 'resnet20', (32, 32, 3)),
)


def optimizers() -> dict[str, optax.GradientTransformation]:
  """The optimizers compared, with the hyperparameters of the training defaults."""
  return {
      'DessiLBI': dl.dessilbi(0.1, kappa=1.0, mu=100.0, momentum=0.9),
      'SGD-momentum': optax.sgd(0.1, momentum=0.9),
      'Adam': optax.adam(1e-3),
  }


def make_step(model, tx):
  """One jitted training step of ``model`` with ``tx`` (batch-norm statistics updated if any)."""

  def loss_fn(params, batch_stats, images, labels):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    if batch_stats:
      logits, new_state = model.apply(variables, images, train=True, mutable=['batch_stats'])
      batch_stats = new_state['batch_stats']
    else:
      logits = model.apply(variables, images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, batch_stats

  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def measure(case, batch_size: int, steps: int, rounds: int) -> dict[str, float]:
  """Images/s per optimizer for one (model, input shape) case."""
  _, model_name, input_shape = case
  model = models.get_model(model_name, 10, input_shape)
  key_init, key_x, key_y = jax.random.split(jax.random.key(0), 3)
  variables = model.init(key_init, jnp.zeros((1, *input_shape)), train=False)
  images = jax.random.normal(key_x, (batch_size, *input_shape))
  labels = jax.random.randint(key_y, (batch_size,), 0, 10)

  runs = {}
  for name, tx in optimizers().items():
    params = jax.tree.map(jnp.copy, variables['params'])
    batch_stats = jax.tree.map(jnp.copy, variables.get('batch_stats', {}))
    carry = (params, batch_stats, tx.init(params))
    step = make_step(model, tx)
    for _ in range(2):   # compile, then one step on the donated buffers
      *carry, loss = step(*carry, images, labels)
    jax.block_until_ready(loss)
    runs[name] = [step, carry, []]

  for _ in range(rounds):
    for name, run in runs.items():
      step, carry, times = run
      start = time.perf_counter()
      for _ in range(steps):
        *carry, loss = step(*carry, images, labels)
      jax.block_until_ready((carry, loss))
      times.append(time.perf_counter() - start)
      run[1] = carry
  return {name: batch_size * steps / statistics.median(times) for name, (_, _, times) in runs.items()}


def table(results: dict[str, dict[str, float]], batch_size: int) -> str:
  names = list(next(iter(results.values())))
  header = ['case (batch %d)' % batch_size] + [f'{n} img/s' for n in names] + \
      [f'{n} / SGD' for n in names if n != 'SGD-momentum']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for label, speeds in results.items():
    sgd = speeds['SGD-momentum']
    row = [label] + [f'{speeds[n]:,.0f}' for n in names] + \
        [f'{speeds[n] / sgd:.2f}' for n in names if n != 'SGD-momentum']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def run(quick: bool = False, batch_size: int = 128) -> str:
  """Measures every case, writes ``results/train_throughput.md`` and returns its text."""
  steps, rounds = (3, 3) if quick else (20, 5)
  results = {}
  for case in CASES:
    results[case[0]] = measure(case, batch_size, steps, rounds)
    print(f'{case[0]}: ' + ', '.join(f'{n} {v:,.0f} img/s' for n, v in results[case[0]].items()), flush=True)
  text = '\n'.join([
      f'Machine: {machine()}.',
      '',
      f'Images per second of one jitted training step (forward, backward, optimizer update) on '
      f'synthetic batches of {batch_size}; median of {rounds} interleaved rounds of {steps} steps; '
      f'ratios from the same run{" (--quick)" if quick else ""}.',
      '',
      table(results, batch_size),
      '',
  ])
  write_result('train_throughput', 'Training throughput', text)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer timed steps (about a minute on 2 CPU cores)')
  parser.add_argument('--batch-size', type=int, default=128)
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error(f'--batch-size must be a positive integer, got {args.batch_size}.')
  print(run(args.quick, args.batch_size))


if __name__ == '__main__':
  main()
