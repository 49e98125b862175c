"""The DessiLBI update rule as an Optax gradient transformation.

Fu, Liu, Li, Sun, Zeng, Yao. *DessiLBI: Exploring Structural Sparsity of Deep
Networks via Differential Inclusion Paths.* ICML 2020,
https://arxiv.org/abs/1905.09449.

One step k -> k+1 (notation of ``ALGORITHM.md``; α the learning rate, κ
``kappa``, ν ``mu``, β ``momentum``, ω ``weight_decay``)::

  b_k     = β·b_{k−1} + g_k + ω·W_k            (ω only on leaves of rank >= 2)
  d_k     = b_k                                 (Nesterov: g_k + ω·W_k + β·b_k)
  W_{k+1} = W_k − α·κ·(d_k + (W_k − Γ_k)/ν)     (leaves without structure: W_k − α·κ·d_k)
  Z_{k+1} = Z_k + (α/ν)·(W_k − Γ_k)
  Γ_{k+1} = κ·prox_λ(Z_{k+1})                   (Z_0 = Γ_0 = 0)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import grouping
from dessilbi_jax import prox


class DessiLBIState(NamedTuple):
  """State of :func:`dessilbi`.

  Attributes:
    count: number of updates applied so far (int32).
    momentum: the heavy-ball buffer ``b``, one per leaf.
    z: the dual variable ``Z`` (``None`` on leaves without structure).
    gamma: the structure variable ``Γ = κ·prox_λ(Z)`` (``None`` likewise).
    gamma_scale: per group, the factor ``s_g = κ·max(0, 1 − λ/‖Z_g‖)`` with
      ``Γ_g = s_g·Z_g``, in the keepdims per-group shape; ``None`` on ``lasso``
      leaves (one group per weight) and on leaves without structure. The ``Z``
      update rebuilds ``Γ_k`` from it instead of reading ``Γ`` (see ``dessilbi``).
    entry_step: per group, the ``count`` after which ``Γ_g`` first became
      non-zero, ``-1`` while it never has; shaped to broadcast against the leaf
      (a conv kernel ``(H, W, I, O)`` under ``filter`` has ``(1, 1, 1, O)``).
  """
  count: chex.Array
  momentum: optax.Updates
  z: optax.Updates
  gamma: optax.Updates
  gamma_scale: optax.Updates
  entry_step: optax.Updates


def _check_number(name: str, value, *, positive: bool = False, below_one: bool = False):
  """Raises ValueError for a concrete number out of range (traced values pass)."""
  try:
    x = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not np.isfinite(x):
    raise ValueError(f'`{name}` must be finite, got {value}.')
  if positive and x <= 0:
    raise ValueError(f'`{name}` must be > 0, got {value}.')
  if not positive and x < 0:
    raise ValueError(f'`{name}` must be >= 0, got {value}.')
  if below_one and x >= 1:
    raise ValueError(f'`{name}` must be in [0, 1), got {value}.')


def _is_number(x) -> bool:
  return isinstance(x, numbers.Number)


def _is_zero(x) -> bool:
  return _is_number(x) and x == 0


def _after(x, token):
  """``x``, made to depend on the scalar ``token`` without changing its value.

  The edge is ``min(|token|, 0)``: exactly zero, also when the token
  overflows, and not folded away by XLA (NaN semantics). See :func:`_written`.
  """
  edge = jnp.minimum(jnp.abs(token), 0)
  return x + edge.astype(jnp.result_type(x))


def _written(x):
  """A token that exists only once the buffer holding ``x`` has been written.

  XLA on CPU forms no multi-output fusions, so ``W``, ``Z`` and ``Γ`` are each
  written by their own fusion, in place into the donated buffers. Unless a data
  edge orders every reader of a buffer before its writer, XLA copies the buffer
  on every step (two extra passes over memory). The token is the sum of the
  first row of ``x`` (``x[0, ..., 0, :]``): XLA gives a reduction its own fusion
  that reads the written buffer (it does not recompute a shared producer inside
  it), so the edge costs a row of loads, not a pass; and under ``jax.jit`` with
  sharded params it is one scalar all-reduce whatever axis is sharded (a slice
  of the flattened array would all-gather it). For ``W`` pass ``w + step``:
  that is what ``optax.apply_updates`` computes, so XLA's CSE makes it the very
  value written to ``W``.
  """
  return jnp.sum(x[(0,) * (x.ndim - 1)], dtype=jnp.float32)


# Structured leaves of at least this many weights are updated one after the
# other: their buffers (about 1 MiB and more in float32) do not all fit in the
# CPU's caches at once, and in sequence the momentum and Z a leaf's first
# fusions write are still cached when its next fusions read them. Smaller
# leaves fit together and gain more from being updated side by side.
_SEQUENTIAL_MIN_SIZE = 2 ** 18


def _lambda_per_kind(lambdas) -> dict[str, Any]:
  if lambdas is None:
    return {kind: 1.0 for kind in grouping.KINDS}
  if isinstance(lambdas, Mapping):
    unknown = set(lambdas) - set(grouping.KINDS)
    if unknown:
      raise ValueError(f'`lambdas` names unknown group kind(s) {sorted(unknown)}; kinds are {grouping.KINDS}.')
    for kind, lam in lambdas.items():
      _check_number(f'lambdas[{kind!r}]', lam)
    return {kind: lambdas.get(kind, 1.0) for kind in grouping.KINDS}
  _check_number('lambdas', lambdas)
  return {kind: lambdas for kind in grouping.KINDS}


def _check_float_params(params):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f'DessiLBI needs floating-point params; leaf {grouping.path_str(path)!r} has dtype '
          f'{jnp.result_type(leaf)}. Keep such leaves out with optax.masked or optax.partition.')


def dessilbi(
    learning_rate: optax.ScalarOrSchedule,
    *,
    kappa: float = 1.0,
    mu: float = 100.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    groups: grouping.GroupsRule = None,
    lambdas: Union[None, float, Mapping[str, float]] = None,
    normalize_groups: bool = False,
    state_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""DessiLBI: SGD coupled with a sparse structure variable on an inverse scale space.

  The weights follow ``W_{k+1} = W_k − α·κ·(d_k + (W_k − Γ_k)/ν)`` where ``d_k``
  is the (heavy-ball or Nesterov) momentum of the loss gradient; the dual
  variable ``Z`` integrates the coupling, ``Z_{k+1} = Z_k + (α/ν)(W_k − Γ_k)``,
  and the structure variable ``Γ = κ·prox_λ(Z)`` starts at zero and gains groups
  of weights (filters, neurons, single weights) one by one. ``Γ`` is read with
  :func:`dessilbi_jax.gamma`, its support with :func:`dessilbi_jax.support`.

  Args:
    learning_rate: α, a number or an optax schedule of the step count.
    kappa: κ > 0, the damping: W moves with step α·κ and Γ = κ·prox(Z).
    mu: ν > 0, the coupling strength between W and Γ (larger: looser).
    momentum: β in [0, 1), heavy-ball momentum on the loss gradient.
    nesterov: use Nesterov's variant of the momentum.
    weight_decay: ω >= 0, L2 decay added to the gradient of leaves of rank >= 2.
    groups: the grouping rule (:mod:`dessilbi_jax.grouping`); ``None`` is the
      reference rule: conv kernels -> ``filter``, 2-D -> ``lasso``, else none.
    lambdas: λ >= 0 of the proximal map: one number for every kind or a
      mapping ``{kind: λ}`` (missing kinds: 1.0). A number works with
      ``optax.inject_hyperparams``.
    normalize_groups: divide ``‖z_g‖`` by ``√(group size)`` in the proximal map.
    state_dtype: dtype of the momentum, ``Z`` and ``Γ``; default: the params'.
      Use ``jnp.float32`` with bf16/f16 params: ``Z`` accumulates steps of size α/ν.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  With ``optax.inject_hyperparams``, every number (``learning_rate``,
  ``kappa``, ``mu``, ``momentum``, ``weight_decay``, a single ``lambdas``)
  becomes part of the state; a callable ``groups`` or a ``state_dtype`` such
  as ``jnp.float32`` is callable too, so name it in ``static_args``:
  ``optax.inject_hyperparams(dl.dessilbi, static_args=('groups', 'state_dtype'))``.

  Example::

    >>> import jax, jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[2.0, 0.01], [2.0, 0.01]])}
    >>> loss = lambda p: jnp.sum((p['w'] - jnp.array([[2.0, 0.0], [2.0, 0.0]])) ** 2)
    >>> tx = dl.dessilbi(0.1, kappa=1.0, mu=1.0, momentum=0.0)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> dl.support(state)['w']      # the large weights entered Γ's support, the small did not
    Array([[ True, False],
           [ True, False]], dtype=bool)
  """
  if not callable(learning_rate):
    _check_number('learning_rate', learning_rate)
  _check_number('kappa', kappa, positive=True)
  _check_number('mu', mu, positive=True)
  _check_number('momentum', momentum, below_one=True)
  _check_number('weight_decay', weight_decay)
  lambda_of = _lambda_per_kind(lambdas)
  if not isinstance(nesterov, (bool, np.bool_)):
    raise ValueError(f'`nesterov` must be True or False, got {nesterov!r}.')

  def init_fn(params):
    _check_float_params(params)
    kinds = grouping.resolve_kinds(params, groups)
    dtype_of = lambda w: state_dtype or jnp.result_type(w)
    per_leaf = lambda f: jax.tree.map(lambda w, k: None if k is None else f(w, k), params, kinds)
    return DessiLBIState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), dtype_of(w)), params),
        z=per_leaf(lambda w, k: jnp.zeros(jnp.shape(w), dtype_of(w))),
        gamma=per_leaf(lambda w, k: jnp.zeros(jnp.shape(w), dtype_of(w))),
        gamma_scale=per_leaf(lambda w, k: None if k == 'lasso'
                             else jnp.zeros(grouping.group_shape(k, jnp.shape(w)), dtype_of(w))),
        entry_step=per_leaf(lambda w, k: jnp.full(grouping.group_shape(k, jnp.shape(w)), -1, jnp.int32)),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('dessilbi needs `params` in update(grads, state, params): W enters the coupling (W − Γ)/ν.')
    kinds = grouping.resolve_kinds(params, groups)
    alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
    new_count = optax.safe_increment(state.count)

    def leaf_update(g, b, w, z, gam, scale, entry, kind, previous):
      """One leaf's step; ``previous`` orders large leaves (``_SEQUENTIAL_MIN_SIZE``)."""
      dtype = b.dtype
      w_param, param_dtype = w, jnp.result_type(w)
      g, w = g.astype(dtype), w.astype(dtype)
      sequential = kind is not None and w.size >= _SEQUENTIAL_MIN_SIZE
      if sequential and previous is not None:   # start once the previous large leaf wrote Γ
        g, z = _after(g, previous), _after(z, previous)
      grad = g + weight_decay * w if (w.ndim >= 2 and not _is_zero(weight_decay)) else g
      b = momentum * b + grad
      d = grad + momentum * b if nesterov else b
      if kind is None:
        return ((-alpha * kappa * d).astype(param_dtype), b, None, None, None, None), previous
      # Γ_k = s_k·Z_k: the Z update rebuilds it, so that only the W update reads
      # the stored Γ_k. Else W's writer would wait for Z's reader of W, and Γ's
      # writer for both readers of Γ. Lasso leaves keep no s (it would be one per
      # weight): they rebuild Γ_k = κ·prox_λ(Z_k) when κ and λ are fixed numbers
      # and read Γ_k when they may have changed since (optax.inject_hyperparams).
      if scale is not None:
        gam_k = z * scale
      elif _is_number(kappa) and _is_number(lambda_of[kind]):
        gam_k, _ = prox.shrink_groups(z, kind, prox.group_norms(z, kind), lambda_of[kind], kappa)
      else:
        gam_k = gam
      z = z + alpha * ((w - gam_k) / mu)
      norms = prox.group_norms(z, kind, normalize_groups)
      # Ordering edges (see `_written`): W is written after Z, Γ after W.
      z_written = _written(z) if kind == 'lasso' else norms.reshape(-1)[0]
      step = _after(-alpha * kappa * (d + (w - gam) / mu), z_written)
      step = step.astype(param_dtype)   # what optax.apply_updates adds to the params
      lam = _after(lambda_of[kind], _written(w_param + step))
      gam, scale = prox.shrink_groups(z, kind, norms, lam, kappa)
      entry = jnp.where((entry < 0) & (norms > lam), new_count, entry)
      results = step, b, z, gam, (None if kind == 'lasso' else scale), entry
      return results, (_written(gam) if sequential else previous)

    treedef = jax.tree.structure(params)
    flat = [treedef.flatten_up_to(t) for t in
            (updates, state.momentum, params, state.z, state.gamma, state.gamma_scale, state.entry_step, kinds)]
    results, previous = [], None
    for args in zip(*flat):
      leaf_results, previous = leaf_update(*args, previous)
      results.append(leaf_results)
    step, b, z, gam, scale, entry = (treedef.unflatten(list(r)) for r in zip(*results))
    return step, DessiLBIState(count=new_count, momentum=b, z=z, gamma=gam, gamma_scale=scale, entry_step=entry)

  return optax.GradientTransformation(init_fn, update_fn)
