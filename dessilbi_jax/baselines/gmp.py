"""Baselines DessiLBI is measured against, as Optax transformations.

* :func:`gmp`: gradual magnitude pruning (Zhu & Gupta 2017) wrapped around any
  optax optimizer, unstructured or per filter / neuron, with its masks in the
  optimizer state; the updates themselves zero the pruned weights.
* :func:`prox_group_lasso`: proximal SGD with a group-lasso penalty, SGD with
  momentum followed by group soft-thresholding.

Both group weights with :mod:`dessilbi_jax.core.grouping`, the rule DessiLBI uses,
so a "filter" here is the same set of weights as a filter in Γ.
:func:`make_baseline` builds either one by name.

Zhu, Gupta. *To prune, or not to prune: exploring the efficacy of pruning for
model compression.* 2017, https://arxiv.org/abs/1710.01878.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax.core import grouping
from dessilbi_jax.core import prox


def unstructured(path: str, leaf) -> grouping.GroupKind:
  """Grouping rule for unstructured pruning: every weight of every kernel alone.

  Pass it as ``groups=``; kernels (rank >= 2) get ``'lasso'``, biases and
  normalization parameters (rank < 2) are left alone.
  """
  del path
  return 'lasso' if np.ndim(leaf) >= 2 else None


def cubic_sparsity_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
) -> optax.Schedule:
  r"""The sparsity schedule of Zhu & Gupta (2017).

  Masks are recomputed at the pruning steps ``t = t0, t0 + Δt, ..., t1``
  (``t0 = begin_step``, ``Δt = frequency``, ``t1 = end_step``, always a pruning
  step) and the sparsity at a pruning step is

    s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³

  Between pruning steps it holds its last value; before ``t0`` it is 0 and
  after ``t1`` it is ``s_f``.

  Example::

    >>> from dessilbi_jax import baselines
    >>> schedule = baselines.cubic_sparsity_schedule(0.8, 0, 100, frequency=10)
    >>> [round(float(schedule(t)), 4) for t in (0, 10, 15, 100, 500)]
    [0.0, 0.2168, 0.2168, 0.8, 0.8]
  """
  _check_fraction('final_sparsity', final_sparsity)
  _check_fraction('initial_sparsity', initial_sparsity)
  if initial_sparsity > final_sparsity:
    raise ValueError(f'`initial_sparsity` ({initial_sparsity}) must not exceed `final_sparsity` ({final_sparsity}).')
  _check_steps(begin_step, end_step, frequency)

  def schedule(step):
    remaining = _cubic_remaining(step, begin_step, end_step, frequency)
    return jnp.where(step < begin_step, 0.0, final_sparsity + (initial_sparsity - final_sparsity) * remaining)

  return schedule


def _cubic_remaining(step, begin_step, end_step, frequency):
  """(1 − (t − t0)/(t1 − t0))³ at the last pruning step t <= step (t clipped to [t0, t1])."""
  t = begin_step + (jnp.clip(step, begin_step, end_step) - begin_step) // frequency * frequency
  remaining = (1.0 - (t - begin_step) / jnp.maximum(end_step - begin_step, 1)) ** 3
  return jnp.where(step >= end_step, 0.0, remaining)


class GMPState(NamedTuple):
  """State of :func:`gmp`.

  Attributes:
    count: number of updates applied so far (int32).
    masks: per leaf, a bool array of the leaf's shape, ``True`` where the
      weight is kept (``None`` on leaves that are not pruned).
    inner_state: the state of the wrapped optimizer.
  """
  count: chex.Array
  masks: Any
  inner_state: optax.OptState


def gmp(
    inner: optax.GradientTransformation,
    final_sparsity: Union[float, Mapping[str, float]],
    *,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
    groups: grouping.GroupsRule = None,
    scope: str = 'layer',
) -> optax.GradientTransformation:
  r"""Gradual magnitude pruning around any optax optimizer.

  At each pruning step ``t`` of :func:`cubic_sparsity_schedule` the groups of
  weights with the smallest norm (one weight for ``'lasso'``, an output filter
  for ``'filter'``, an output unit for ``'neuron'``, as in
  :mod:`dessilbi_jax.core.grouping`) are masked, exactly ``round(s_t · n)`` of the
  ``n`` groups (round half to even; ties go to the lower index). Steps after
  ``end_step`` fine-tune the network at the final sparsity. The wrapped
  optimizer sees the gradients times the masks, and the returned updates take
  masked weights to exactly zero under ``optax.apply_updates``, so the params
  are always the pruned network.

  Args:
    inner: the optimizer to wrap (``optax.sgd(0.1, momentum=0.9)``, ...).
    final_sparsity: ``s_f`` in [0, 1], the fraction of groups removed at the
      end: one number, or ``{leaf path: s_f}`` naming every pruned leaf (paths
      as in :func:`dessilbi_jax.core.grouping.path_str`, e.g. ``'Conv_0/kernel'``)
      to give each layer its own target (``scope='layer'`` only).
    begin_step: ``t0``, the first pruning step.
    end_step: ``t1``, the last pruning step; fine-tuning follows.
    frequency: ``Δt``, steps between pruning steps.
    initial_sparsity: ``s_i``, the sparsity of the first pruning step.
    groups: the grouping rule of :mod:`dessilbi_jax.core.grouping`; ``None`` is
      DessiLBI's default (conv kernels by filter, dense kernels by weight,
      nothing else pruned); :func:`unstructured` prunes single weights of
      every kernel. Leaves of kind ``None`` are never pruned.
    scope: ``'layer'``: every pruned leaf reaches ``s_t`` on its own;
      ``'global'``: ``round(s_t · N)`` of all ``N`` groups of all pruned
      leaves, ranked together by ``‖w_g‖ / √(group size)``.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``. Read the
    masks with :func:`masks`.

  Example::

    >>> import jax, jax.numpy as jnp, optax
    >>> from dessilbi_jax import baselines
    >>> params = {'w': jnp.arange(1.0, 11.0).reshape(2, 5)}
    >>> tx = baselines.gmp(optax.sgd(0.0), 0.6, begin_step=0, end_step=0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    >>> optax.apply_updates(params, updates)['w']   # the 6 smallest of 10 weights are gone
    Array([[ 0.,  0.,  0.,  0.,  0.],
           [ 0.,  7.,  8.,  9., 10.]], dtype=float32)
  """
  if scope not in ('layer', 'global'):
    raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}.")
  if isinstance(final_sparsity, Mapping):
    if scope == 'global':
      raise ValueError("Per-leaf `final_sparsity` needs scope='layer'; with scope='global' give one number.")
    for path, s in final_sparsity.items():
      _check_fraction(f'final_sparsity[{path!r}]', s, closed=True)
    targets = dict(final_sparsity)
  else:
    _check_fraction('final_sparsity', final_sparsity, closed=True)
    if _concrete(initial_sparsity, final_sparsity) and initial_sparsity > final_sparsity:
      raise ValueError(f'`initial_sparsity` ({initial_sparsity}) must not exceed `final_sparsity` ({final_sparsity}).')
    targets = None
  _check_steps(begin_step, end_step, frequency)
  _check_fraction('initial_sparsity', initial_sparsity)

  def leaf_targets(params, kinds):
    paths = {grouping.path_str(p) for p, k in _flat_with_path(kinds) if k is not None}
    if targets is None:
      return jax.tree.map(lambda k: None if k is None else final_sparsity, kinds, is_leaf=_is_kind)
    missing, unknown = sorted(paths - set(targets)), sorted(set(targets) - paths)
    if missing or unknown:
      raise ValueError(
          f'Per-leaf `final_sparsity` must name exactly the pruned leaves {sorted(paths)}; '
          f'missing {missing}, unknown {unknown}.')
    too_low = {p: s for p, s in targets.items() if s < initial_sparsity}
    if too_low:
      raise ValueError(f'`initial_sparsity` ({initial_sparsity}) exceeds the final sparsity of {too_low}.')
    flat, treedef = jax.tree_util.tree_flatten_with_path(kinds, is_leaf=_is_kind)
    return treedef.unflatten([None if k is None else targets[grouping.path_str(p)] for p, k in flat])

  def sparsity_at(count, s_f):
    remaining = _cubic_remaining(count, begin_step, end_step, frequency)
    return jnp.where(count < begin_step, 0.0, s_f + (initial_sparsity - s_f) * remaining)

  def init_fn(params):
    kinds = grouping.resolve_kinds(params, groups)
    leaf_targets(params, kinds)
    masks = jax.tree.map(
        lambda w, k: None if k is None else jnp.ones(jnp.shape(w), bool), params, kinds, is_leaf=_is_none)
    return GMPState(count=jnp.zeros([], jnp.int32), masks=masks, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:   # extra_args go to `inner`, which may ignore them (optax's convention)
      raise ValueError('gmp needs `params` in update(grads, state, params): it ranks the weights by magnitude.')
    kinds = grouping.resolve_kinds(params, groups)
    s_final = leaf_targets(params, kinds)
    grads = jax.tree.map(_apply_mask, updates, state.masks, is_leaf=_is_none)
    inner_updates, inner_state = optax.with_extra_args_support(inner).update(
        grads, state.inner_state, params, **extra_args)
    # Pruned weights score 0 so that they stay pruned: masks only ever lose entries.
    candidate = jax.tree.map(_apply_mask, optax.apply_updates(params, inner_updates), state.masks, is_leaf=_is_none)
    if scope == 'global':
      sparsity = sparsity_at(state.count, final_sparsity)
    else:
      sparsity = jax.tree.map(lambda s: sparsity_at(state.count, s), s_final)
    is_pruning_step = _is_pruning_step(state.count, begin_step, end_step, frequency)
    masks = jax.lax.cond(
        is_pruning_step,
        lambda: magnitude_masks(candidate, kinds, sparsity, scope),
        lambda: state.masks)
    # Masked weights get the update −w: w + (−w) is exactly 0 in floating point.
    new_updates = jax.tree.map(
        lambda u, m, w: u if m is None else jnp.where(m, u, -w).astype(u.dtype),
        inner_updates, masks, params, is_leaf=_is_none)
    return new_updates, GMPState(count=optax.safe_increment(state.count), masks=masks, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def magnitude_masks(params, kinds, sparsity, scope: str = 'layer'):
  """Keep-masks removing exactly ``round(s · n)`` smallest-norm groups.

  Args:
    params: the weights to rank.
    kinds: a pytree of group kinds (:func:`dessilbi_jax.core.grouping.resolve_kinds`).
    sparsity: with ``scope='layer'`` a pytree of fractions with ``kinds``'
      structure (``None`` where the kind is ``None``); with ``'global'`` one
      fraction for all leaves together.
    scope: ``'layer'`` or ``'global'`` (see :func:`gmp`).

  Returns:
    Bool masks of the params' shapes, ``None`` on leaves of kind ``None``.
  """
  flat, treedef = jax.tree_util.tree_flatten(params)
  flat_kinds = treedef.flatten_up_to(kinds)
  scores = [None if k is None else prox.group_norms(jnp.asarray(w, jnp.float32), k, normalize=scope == 'global')
            for w, k in zip(flat, flat_kinds)]
  if scope == 'layer':
    flat_sparsity = treedef.flatten_up_to(sparsity)
    keeps = [None if s is None else _keep_top(s.reshape(-1), f) for s, f in zip(scores, flat_sparsity)]
  else:
    scored = [s.reshape(-1) for s in scores if s is not None]
    keep_all = _keep_top(jnp.concatenate(scored), sparsity)
    keeps = iter(jnp.split(keep_all, np.cumsum([s.size for s in scored])[:-1]))
    keeps = [None if s is None else next(keeps) for s in scores]
  masks = [None if keep is None else jnp.broadcast_to(keep.reshape(s.shape), jnp.shape(w))
           for keep, s, w in zip(keeps, scores, flat)]
  return treedef.unflatten(masks)


def masks(state):
  """The keep-masks of the :func:`gmp` state found in ``state`` (any optax state holding it)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_gmp_state) if isinstance(s, GMPState)]
  if len(found) != 1:
    raise ValueError(f'Expected exactly one GMPState inside the optimizer state, found {len(found)}.')
  return found[0].masks


class GroupLassoProxState(NamedTuple):
  """State of :func:`group_lasso_prox`: the step count (for schedules)."""
  count: chex.Array


def group_lasso_prox(
    learning_rate: optax.ScalarOrSchedule,
    penalty: float,
    *,
    groups: grouping.GroupsRule = None,
    normalize_groups: bool = False,
) -> optax.GradientTransformation:
  r"""The proximal step of the group-lasso penalty ``λ·Σ_g ‖w_g‖₂``.

  Placed after a gradient step that proposes ``w' = w + u`` it returns the
  update to ``prox_{αλ}(w')``, group by group
  ``w'_g · max(0, 1 − αλ / ‖w'_g‖₂)`` (:func:`dessilbi_jax.core.prox.group_prox`).
  Leaves of kind ``None`` pass unchanged.
  """
  if not callable(learning_rate):
    _check_nonnegative('learning_rate', learning_rate)
  _check_nonnegative('penalty', penalty)

  def init_fn(params):
    grouping.resolve_kinds(params, groups)
    return GroupLassoProxState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('group_lasso_prox needs `params` in update(grads, state, params).')
    kinds = grouping.resolve_kinds(params, groups)
    alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
    proposed = optax.apply_updates(params, updates)

    def leaf(u, w_new, w, kind):
      if kind is None:
        return u
      shrunk, _ = prox.group_prox(w_new, kind, alpha * penalty, normalize_groups)
      return (shrunk - w).astype(u.dtype)

    new_updates = jax.tree.map(leaf, updates, proposed, params, kinds, is_leaf=_is_none)
    return new_updates, GroupLassoProxState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def prox_group_lasso(
    learning_rate: optax.ScalarOrSchedule,
    penalty: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    groups: grouping.GroupsRule = None,
    normalize_groups: bool = False,
) -> optax.GradientTransformation:
  r"""Proximal SGD with momentum for ``L(W) + λ·Σ_g ‖W_g‖₂``.

  One step::

    b_k     = β·b_{k−1} + g_k + ω·W_k          (ω on leaves of rank >= 2)
    W'      = W_k − α·b_k                       (Nesterov: W_k − α·(g_k + ω·W_k + β·b_k))
    W_{k+1} = prox_{αλ}(W'),   prox_{αλ}(w)_g = w_g · max(0, 1 − αλ / ‖w_g‖₂)

  on the groups of :mod:`dessilbi_jax.core.grouping` (default: DessiLBI's, conv
  filters and single dense weights); groups shrunk to zero are exactly zero.
  Unlike DessiLBI, the sparsity reached depends on λ, so a target sparsity
  needs a sweep over λ.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> from dessilbi_jax import baselines
    >>> params = {'w': jnp.array([[3.0, 0.1], [4.0, 0.1]])}
    >>> tx = baselines.prox_group_lasso(0.5, 2.0, momentum=0.0, groups={'w': 'neuron'})
    >>> updates, _ = tx.update({'w': jnp.zeros((2, 2))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)['w']   # neuron 0 scaled by 1 − 1/5, neuron 1 removed
    Array([[2.4, 0. ],
           [3.2, 0. ]], dtype=float32)
  """
  _check_nonnegative('momentum', momentum)
  _check_nonnegative('weight_decay', weight_decay)
  decay = optax.add_decayed_weights(weight_decay, mask=lambda p: jax.tree.map(lambda w: jnp.ndim(w) >= 2, p))
  return optax.chain(
      decay,
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
      group_lasso_prox(learning_rate, penalty, groups=groups, normalize_groups=normalize_groups),
  )


BASELINES = ('gmp', 'gmp_structured', 'prox_group_lasso')


def make_baseline(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    total_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    sparsity: float = 0.9,
    penalty: float = 1e-3,
    groups: grouping.GroupsRule = None,
) -> optax.GradientTransformation:
  """A baseline by name, with the schedule used by the benchmarks.

  * ``'gmp'``: :func:`gmp` of SGD-momentum, every kernel weight alone
    (:func:`unstructured`), to ``sparsity``;
  * ``'gmp_structured'``: the same with ``groups`` (default: DessiLBI's
    filters for conv kernels, single weights for dense kernels);
  * ``'prox_group_lasso'``: :func:`prox_group_lasso` with ``penalty``.

  GMP follows :func:`pruning_steps`.
  """
  if name not in BASELINES:
    raise ValueError(f'Unknown baseline {name!r}; choose one of {BASELINES}.')
  if name == 'prox_group_lasso':
    return prox_group_lasso(learning_rate, penalty, momentum=momentum, weight_decay=weight_decay, groups=groups)
  sgd = optax.chain(
      optax.add_decayed_weights(weight_decay, mask=lambda p: jax.tree.map(lambda w: jnp.ndim(w) >= 2, p)),
      optax.sgd(learning_rate, momentum=momentum))
  return gmp(sgd, sparsity, groups=unstructured if name == 'gmp' else groups, **pruning_steps(total_steps))


def pruning_steps(total_steps: int) -> dict[str, int]:
  """``begin_step``, ``end_step``, ``frequency`` of :func:`gmp` for a run of ``total_steps``.

  Prunes from 10% to 60% of the run in 20 pruning steps and fine-tunes for the
  last 40%, the shape of Zhu & Gupta's schedules.
  """
  if total_steps < 1:
    raise ValueError(f'`total_steps` must be >= 1, got {total_steps}.')
  begin_step, end_step = int(0.1 * total_steps), int(0.6 * total_steps)
  return dict(begin_step=begin_step, end_step=end_step, frequency=max(1, (end_step - begin_step) // 20))


def _keep_top(scores, sparsity):
  """Bool vector: False for exactly round(sparsity · n) lowest scores (stable ties)."""
  n = scores.shape[0]
  num_pruned = jnp.round(sparsity * n).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
  return rank >= num_pruned


def _is_pruning_step(count, begin_step, end_step, frequency):
  in_window = (count >= begin_step) & (count <= end_step)
  return in_window & (((count - begin_step) % frequency == 0) | (count == end_step))


def _apply_mask(g, m):
  return g if m is None else jnp.where(m, g, jnp.zeros_like(g))


def _flat_with_path(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_kind)[0]


def _is_kind(x):
  return x is None or isinstance(x, str)


def _is_none(x):
  return x is None


def _is_gmp_state(x):
  return isinstance(x, GMPState)


def _concrete(*values) -> bool:
  """Whether every value is a known number (not traced, e.g. under ``optax.inject_hyperparams``)."""
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def _check_fraction(name, value, closed=False):
  if not _concrete(value):
    return
  if not (0.0 <= float(value) <= 1.0 if closed else 0.0 <= float(value) < 1.0):
    raise ValueError(f'`{name}` must be a fraction in [0, 1{"]" if closed else ")"}, got {value}.')


def _check_steps(begin_step, end_step, frequency):
  if not _concrete(begin_step, end_step, frequency):
    return
  if not 0 <= begin_step <= end_step:
    raise ValueError(f'Need 0 <= begin_step <= end_step; got begin_step={begin_step}, end_step={end_step}.')
  if frequency < 1:
    raise ValueError(f'`frequency` must be >= 1 step, got {frequency}.')


def _check_nonnegative(name, value):
  """Raises ValueError for a concrete negative or NaN number (traced values pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not float(value) >= 0.0:
    raise ValueError(f'`{name}` must be >= 0, got {value}.')
