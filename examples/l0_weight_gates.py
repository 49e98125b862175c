"""L0 gates without the trainer: an MLP on digits, its input neurons gated, kept at 30 % by a constraint.

The pieces of :mod:`dessilbi_jax.l0` in one optax loop (Gallego-Posada et al.
2022): hard-concrete gates on weight groups (``weight_gates``), the
Lagrangian of the loss and a density constraint (``constraints.lagrangian``),
simultaneous gradient descent on the weights and gates (the gates' optimizer
clamped, ``l0.clamped``) and ascent on the multiplier (``constraints.dual_ascent``).
``dessilbi train --optimizer l0`` does the same on the units of any zoo model.

  python examples/l0_weight_gates.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import data
from dessilbi_jax import l0
from dessilbi_jax import models
from dessilbi_jax.l0 import constraints
from dessilbi_jax.l0 import weight_gates

TARGET = 0.3
# Few steps, so the dual and gate learning rates are far above the seed paper's
# (7e-4 and 6.0 over 200 CIFAR epochs): λ must grow within a few hundred steps.
GATES_LR, DUAL_LR = 6.0, 0.5


def main(steps: int = 400, target: float = TARGET, scope: str = 'model', seed: int = 0, data_dir=None) -> dict:
  x, y = data.load_arrays('digits', 'train', data_dir=data_dir)
  xt, yt = data.load_arrays('digits', 'test', data_dir=data_dir)
  x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
  model = models.MLP(widths=(64,), num_classes=10)
  params = model.init(jax.random.key(seed), x[:1])['params']
  kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})   # one gate per input neuron of each layer
  params, log_alphas = weight_gates.init_gates(jax.random.key(seed + 1), params, kinds, droprate_init=0.5)
  sizes = weight_gates.group_sizes(params, kinds)
  density = l0.density_constraint(sizes, target, scope=scope)

  def loss_fn(trainable, images, labels, key):
    params, log_alphas = trainable
    z = l0.sample_gates_tree(key, log_alphas)   # one sample per step, shared by the batch
    logits = model.apply({'params': weight_gates.gate_weights(params, z, kinds)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  objective = constraints.lagrangian(loss_fn, lambda trainable: density(trainable[1]))
  tx = optax.sgd(0.1, momentum=0.9)
  gates_tx, dual_tx = l0.clamped(optax.sgd(GATES_LR)), constraints.dual_ascent(DUAL_LR)
  multipliers = jax.tree.map(jnp.zeros_like, density(log_alphas))
  states = (tx.init(params), gates_tx.init(log_alphas), dual_tx.init(multipliers))

  @jax.jit
  def step(params, log_alphas, multipliers, states, images, labels, key):
    (grads, gate_grads), (loss, violations) = jax.grad(objective, has_aux=True)(
        (params, log_alphas), multipliers, images, labels, key)
    updates, s0 = tx.update(grads, states[0], params)
    gate_updates, s1 = gates_tx.update(gate_grads, states[1], log_alphas)
    dual_updates, s2 = dual_tx.update(violations, states[2], multipliers)   # g at this step's point
    return (optax.apply_updates(params, updates), optax.apply_updates(log_alphas, gate_updates),
            optax.apply_updates(multipliers, dual_updates), (s0, s1, s2), loss)

  rng, key = np.random.default_rng(seed), jax.random.key(seed + 2)
  images, labels = jnp.asarray(x), jnp.asarray(y)
  for t in range(steps):
    batch = rng.integers(0, len(x), 128)
    params, log_alphas, multipliers, states, loss = step(params, log_alphas, multipliers, states, images[batch],
                                                         labels[batch], jax.random.fold_in(key, t))
  median = jax.tree.map(l0.median_gates, log_alphas)   # test time: the median gates
  logits = model.apply({'params': weight_gates.gate_weights(params, median, kinds)}, xt)
  result = dict(model_density=float(l0.model_density(log_alphas, sizes)),
                layer_densities={k: float(v) for k, v in l0.layer_densities(log_alphas, sizes).items()},
                multipliers=jax.tree.map(float, multipliers), loss=float(loss),
                test_acc=float(np.mean(np.asarray(logits).argmax(-1) == yt)))
  print(f'expected density {100 * result["model_density"]:.1f} % (target {100 * target:g} %, {scope}-wise), '
        f'test accuracy with the median gates {100 * result["test_acc"]:.1f} %')
  return result


if __name__ == '__main__':
  main()
