r"""One training step of an L0-gated network under density constraints (or a fixed penalty).

Per step, one forward/backward of the Lagrangian (simultaneous gradient
descent–ascent, Gallego-Posada et al. 2022):

  z ~ hard-concrete(log_α), one sample from the step's key
  L = cross_entropy(f(θ, z; x), y) + Σ_k λ_k·(density_k(log_α) − ε_k)
  θ ← tx(∂L/∂θ)                 (SGD-momentum; its schedule decays)
  log_α ← clamp(gates_tx(∂L/∂log_α))   (its own optimizer, a learning rate never decayed)
  λ ← dual(λ, density − ε)      (dual SGD, restarts, λ ≥ 0; or fixed: the penalized problem)

``apply_fn(params, z, images) -> logits`` says how the gates act on the model:
:func:`dessilbi_jax.l0.weight_gates.gate_weights` for weight groups, the unit map for
channels followed by BatchNorm. Evaluation uses the median gates.

Example: the input neurons of an MLP on random data, kept at 30 % model-wise::

  >>> import jax, jax.numpy as jnp, optax
  >>> from dessilbi_jax import l0, models
  >>> from dessilbi_jax.l0 import constraints
  >>> from dessilbi_jax.l0 import training as l0_training
  >>> from dessilbi_jax.l0 import weight_gates
  >>> model = models.MLP(widths=(16,), num_classes=3)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8)))['params']
  >>> kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})
  >>> params, log_alphas = weight_gates.init_gates(jax.random.key(1), params, kinds, droprate_init=0.5)
  >>> apply_fn = lambda p, z, x: model.apply({'params': weight_gates.gate_weights(p, z, kinds)}, x)
  >>> constraint_fn = l0.density_constraint(weight_gates.group_sizes(params, kinds), 0.3, scope='model')
  >>> init, step = l0_training.l0_train_step(apply_fn, constraint_fn, optax.sgd(0.1, momentum=0.9),
  ...                                        optax.sgd(1.0), constraints.dual_ascent(1e-2))
  >>> state = init(params, log_alphas)
  >>> state, metrics = jax.jit(step)(state, jnp.ones((4, 8)), jnp.array([0, 1, 2, 0]), jax.random.key(2))
  >>> sorted(metrics)
  ['loss', 'multipliers', 'violations']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dessilbi_jax.l0 import constraints
from dessilbi_jax import l0


class L0TrainState(NamedTuple):
  """Everything an L0 run trains.

  Attributes:
    params: the network's weights θ.
    log_alphas: the gates' ``log_α``, ``{leaf path: array}``.
    opt_state: ``tx``'s state for θ.
    gates_opt_state: ``gates_tx``'s state for ``log_α``.
    dual_state: the multipliers (:class:`dessilbi_jax.l0.constraints.DualState`).
  """
  params: Any
  log_alphas: Any
  opt_state: optax.OptState
  gates_opt_state: optax.OptState
  dual_state: constraints.DualState


def l0_train_step(
    apply_fn: Callable[[Any, Any, jax.Array], jax.Array],
    constraint_fn: Callable[[Any], Any],
    tx: optax.GradientTransformation,
    gates_tx: optax.GradientTransformation,
    dual: constraints.DualTransformation,
) -> tuple[Callable[..., L0TrainState], Callable[..., tuple[L0TrainState, dict[str, Any]]]]:
  """``(init, step)`` of constrained (or, with fixed multipliers, penalized) L0 training.

  Args:
    apply_fn: ``(params, z, images) -> logits``, the network with gates ``z``
      (a pytree shaped like ``log_alphas``).
    constraint_fn: ``log_alphas -> violations`` (``≤ 0`` satisfied), e.g.
      :func:`dessilbi_jax.l0.density_constraint`; for the penalized problem
      the density itself (``lambda a: l0.model_density(a, sizes)``).
    tx: the weights' optimizer (SGD-momentum, lr 0.1, in the seed paper).
    gates_tx: the gates' own optimizer; keep its learning rate constant.
    dual: :func:`dessilbi_jax.l0.constraints.dual_ascent`, or
      :func:`~dessilbi_jax.l0.constraints.fixed_multipliers` for a penalty.

  Returns:
    ``init(params, log_alphas) -> L0TrainState`` and ``step(state, images,
    labels, key) -> (state, metrics)``, a pure function to jit; ``metrics``
    holds the cross-entropy ``loss``, the ``violations`` the dual step used and
    the ``multipliers`` after it.
  """
  def loss_fn(trainable, images, labels, key):
    params, log_alphas = trainable
    logits = apply_fn(params, l0.sample_gates_tree(key, log_alphas), images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  objective = constraints.lagrangian(loss_fn, lambda trainable: constraint_fn(trainable[1]))

  def init(params, log_alphas):
    return L0TrainState(params, log_alphas, tx.init(params), gates_tx.init(log_alphas),
                        dual.init(constraint_fn(log_alphas)))

  def step(state, images, labels, key):
    trainable = (state.params, state.log_alphas)
    (param_grads, gate_grads), (loss, violations) = jax.grad(objective, has_aux=True)(
        trainable, state.dual_state.multipliers, images, labels, key)
    updates, opt_state = tx.update(param_grads, state.opt_state, state.params)
    gate_updates, gates_opt_state = gates_tx.update(gate_grads, state.gates_opt_state, state.log_alphas)
    dual_state = dual.update(state.dual_state, violations)
    new_state = L0TrainState(
        params=optax.apply_updates(state.params, updates),
        log_alphas=l0.clamp_log_alpha(optax.apply_updates(state.log_alphas, gate_updates)),
        opt_state=opt_state, gates_opt_state=gates_opt_state, dual_state=dual_state)
    return new_state, {'loss': loss, 'violations': violations, 'multipliers': dual_state.multipliers}

  return init, step


def eval_logits(apply_fn: Callable[[Any, Any, jax.Array], jax.Array], state: L0TrainState,
                images: jax.Array) -> jax.Array:
  """The network at test time: every gate at its median ``ẑ``."""
  return apply_fn(state.params, jax.tree.map(l0.median_gates, state.log_alphas), images)
