"""The DessiLBI update rule as an Optax gradient transformation.

Fu, Liu, Li, Sun, Zeng, Yao. *DessiLBI: Exploring Structural Sparsity of Deep
Networks via Differential Inclusion Paths.* ICML 2020,
https://arxiv.org/abs/1905.09449.

One step k -> k+1 (notation of ``docs/ALGORITHM.md``; α the learning rate, κ
``kappa``, ν ``mu``, β ``momentum``, ω ``weight_decay``)::

  b_k     = β·b_{k−1} + g_k + ω·W_k            (ω on the leaves weight_decay_mask picks: rank >= 2)
  d_k     = b_k                                 (Nesterov: g_k + ω·W_k + β·b_k)
  W_{k+1} = W_k − α·κ·(d_k + (W_k − Γ_k)/ν)     (leaves without structure: W_k − α·κ·d_k)
  Z_{k+1} = Z_k + (α/ν)·(W_k − Γ_k)
  Γ_{k+1} = κ·prox_λ(Z_{k+1})                   (Z_0 = Γ_0 = 0)

The maths of one leaf is :func:`leaf_update`; the order of its writes on XLA's
CPU backend (zero-valued data edges) is :mod:`dessilbi_jax.core.cpu_schedule`.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from flax import nnx as _nnx
except ImportError:   # flax is only needed for its nnx Variables
  _nnx = None

from dessilbi_jax.core import cpu_schedule
from dessilbi_jax.core import grouping
from dessilbi_jax.core import lean_state
from dessilbi_jax.core import prox
from dessilbi_jax.core import target_density as targets


class DessiLBIState(NamedTuple):
  """State of :func:`dessilbi`.

  Attributes:
    count: number of updates applied so far (int32).
    trace: the heavy-ball buffer ``b``, one per leaf (optax's SGD calls it
      ``trace`` too; no field shares a hyperparameter's name, so that
      ``optax.tree_utils.tree_set(state, momentum=0.5)`` under
      ``optax.inject_hyperparams`` sets β, not the buffer).
    z: the dual variable ``Z`` (``None`` on leaves without structure).
    gamma: the structure variable ``Γ = κ·prox_λ(Z)`` (``None`` likewise, and on
      every leaf of a lean state, ``store_gamma=False``: read it with
      :func:`dessilbi_jax.gamma`, which rebuilds it from the fields below).
    gamma_scale: per group, the factor ``s_g = κ·max(0, 1 − λ/‖Z_g‖)`` with
      ``Γ_g = s_g·Z_g``, in the keepdims per-group shape; ``None`` on ``lasso``
      leaves (one group per weight) and on leaves without structure. The ``Z``
      update rebuilds ``Γ_k`` from it instead of reading ``Γ`` (see ``dessilbi``).
    entry_step: per group, the ``count`` after which ``Γ_g`` first became
      non-zero, ``-1`` while it never has; shaped to broadcast against the leaf
      (a conv kernel ``(H, W, I, O)`` under ``filter`` has ``(1, 1, 1, O)``).
    threshold: with ``target_density``, per structured leaf the float32
      scalar ``t`` of :mod:`dessilbi_jax.core.target_density` that the next step's
      λ is raised by; ``None`` without a target.
    gamma_kappa: in a lean state, on ``lasso`` leaves the κ that made ``Γ_k``
      (a scalar in λ's dtype, at least float32), ``None`` on other leaves; the
      field is ``None`` when ``Γ`` is stored.
    gamma_lambda: likewise the λ that made ``Γ_k`` (under a target density
      the effective λ), so that ``Γ_k = κ·prox_λ(Z_k)`` is rebuilt to the bit
      however κ and λ change (``optax.inject_hyperparams``).
  """
  count: chex.Array
  trace: optax.Updates
  z: optax.Updates
  gamma: optax.Updates
  gamma_scale: optax.Updates
  entry_step: optax.Updates
  threshold: optax.Updates = None
  gamma_kappa: optax.Updates = None
  gamma_lambda: optax.Updates = None

  @property
  def momentum(self):
    """Deprecated: the buffer is :attr:`trace` (read-only alias, not a pytree field)."""
    warnings.warn('DessiLBIState.momentum is now DessiLBIState.trace (the name momentum is the '
                  "hyperparameter's, for optax.inject_hyperparams).", DeprecationWarning, stacklevel=2)
    return self.trace


def state_spec(leaf, param_spec):
  """The ``PartitionSpec`` of a state leaf, given its param's: for ``optax.tree.map_params``.

  Leaves without structure (``None``) stay ``None``; a per-group leaf drops the
  axes a group spans (size 1 in its keepdims shape).

  Example::

    >>> import jax.numpy as jnp, optax
    >>> from jax.sharding import PartitionSpec as P
    >>> import dessilbi_jax as dl
    >>> params = {'kernel': jnp.ones((3, 3, 8, 16)), 'bias': jnp.zeros(16)}
    >>> tx = dl.dessilbi(0.1)
    >>> specs = optax.tree.map_params(tx, dl.state_spec, tx.init(params),
    ...                               {'kernel': P(None, None, None, 'd'), 'bias': P('d')},
    ...                               transform_non_params=lambda _: P(), is_leaf=lambda x: x is None)
    >>> specs.entry_step
    {'bias': None, 'kernel': P(None, None, None, 'd')}
  """
  if leaf is None:
    return None
  if jnp.ndim(leaf) == 0:   # a per-leaf scalar (the target's threshold)
    return type(param_spec)()
  padded = tuple(param_spec) + (None,) * (jnp.ndim(leaf) - len(param_spec))
  if all(axis is None or size > 1 for axis, size in zip(padded, jnp.shape(leaf))):
    return param_spec
  return type(param_spec)(*(axis if size > 1 else None for axis, size in zip(padded, jnp.shape(leaf))))


def _check_number(name: str, value, *, positive: bool = False, below_one: bool = False,
                  schedule: bool = False):
  """Raises for anything but a number (or scalar array) in range; ``schedule``: a callable too.

  Arrays are what ``optax.inject_hyperparams`` passes; traced ones are not
  range-checked (their values are not known when the update is traced).
  """
  if callable(value):
    if schedule:
      return
    raise TypeError(f'`{name}` must be a number, got the callable {value!r}: only `learning_rate` takes a '
                    f'schedule here. To schedule `{name}`, use optax.inject_hyperparams(dl.dessilbi)'
                    f'({name}=schedule, ...).')
  kinds = 'a number, a scalar array' + (' or a schedule (a callable of the step count)' if schedule else '')
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, jax.Array, np.ndarray, np.generic)):
    raise TypeError(f'`{name}` must be {kinds}, got {type(value).__name__} {value!r}.')
  if (np.ndim(value) != 0 or not (jnp.issubdtype(jnp.result_type(value), jnp.floating)
                                  or jnp.issubdtype(jnp.result_type(value), jnp.integer))):
    raise TypeError(f'`{name}` must be {kinds}, got an array of shape {np.shape(value)} and dtype '
                    f'{jnp.result_type(value)}.')
  try:
    x = float(value)
  except jax.errors.ConcretizationTypeError:
    return
  if not np.isfinite(x):
    raise ValueError(f'`{name}` must be finite, got {value}.')
  if positive and x <= 0:
    raise ValueError(f'`{name}` must be > 0, got {value}.')
  if not positive and x < 0:
    raise ValueError(f'`{name}` must be >= 0, got {value}.')
  if below_one and x >= 1:
    raise ValueError(f'`{name}` must be in [0, 1), got {value}.')


def _check_flag(name: str, value, meaning: str = ''):
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'`{name}` must be True or False, got {value!r}{meaning}.')


def _is_number(x) -> bool:
  return isinstance(x, numbers.Number)


def _is_zero(x) -> bool:
  return _is_number(x) and x == 0


class _StepHyper(NamedTuple):
  """The numbers of one step: α (``alpha``), κ, ν (``mu``), β, ω, λ per kind, and k + 1 (``count``)."""
  alpha: Any
  kappa: Any
  mu: Any
  momentum: Any
  nesterov: bool
  weight_decay: Any
  lambdas: Mapping[str, Any]
  normalize: bool
  count: chex.Array


def _unordered(x, written):
  del written
  return x


class LeafStep(NamedTuple):
  """What one leaf's step gives (:func:`leaf_update`); ``None`` fields where the leaf has no such variable."""
  step: Any      # W_{k+1} − W_k, what optax.apply_updates adds
  trace: Any     # b_k, the momentum buffer
  z: Any         # Z_{k+1}
  gamma: Any     # Γ_{k+1} (None in a lean state)
  scale: Any     # s_{k+1}, Γ_g = s_g·Z_g per group (None on lasso leaves)
  entry: Any     # the step each group entered Γ's support (−1: not yet)
  made: Any      # the (κ, λ) of Γ_{k+1} on a lean state's lasso leaves


def leaf_update(g, b, w, z, gam, scale, entry, kind, made=None, decay=None, *, hyper: _StepHyper,
                after=_unordered, store_gamma: bool = True):
  """One leaf's step k -> k+1 (docs/ALGORITHM.md), a :class:`LeafStep`.

  ``kind`` is the leaf's group kind (``None``: no structure variable). ``after(x,
  written)`` is ``x``; :mod:`dessilbi_jax.core.cpu_schedule` passes one that also
  orders the writes of ``Z``, ``W`` and ``Γ`` on the CPU, without changing a bit.
  A lean state (``store_gamma=False``) has ``gam`` ``None`` and returns ``Γ_{k+1}``
  ``None``; ``made`` is ``(κ, λ)`` of ``Γ_k`` on its lasso leaves (else ``None``).
  ``decay``: whether ω applies to the leaf (``None``: on leaves of rank >= 2).
  """
  lam = None if kind is None else _lambda(hyper.lambdas[kind], b.dtype)
  step, b, z, norms = coupled_update(g, b, w, z, gam, scale, kind, lam, made, decay, hyper=hyper, after=after)
  if kind is None:
    return LeafStep(step, b, None, None, None, None, None)
  lam = after(lam, w + step)                              # Γ written after W
  return LeafStep(step, b, z, *structure_update(z, norms, entry, kind, lam, hyper=hyper, store_gamma=store_gamma))


def coupled_update(g, b, w, z, gam, scale, kind, lam, made=None, decay=None, *, hyper: _StepHyper,
                   after=_unordered):
  """The momentum, ``W`` and ``Z`` of one leaf's step; returns ``(W_{k+1} − W_k, b_k, Z_{k+1}, ‖Z_{k+1,g}‖)``.

  ``lam`` is the λ that made ``Γ_k`` (``Z`` and the norms are ``None`` without structure).
  ``gam`` ``None`` (a lean state): both halves read ``Γ_k`` rebuilt from ``Z_k``
  (``made``: the κ and λ that made it, on lasso leaves).
  """
  h = hyper
  param_dtype, dtype = jnp.result_type(w), b.dtype
  g, w = g.astype(dtype), w.astype(dtype)
  decay = w.ndim >= 2 if decay is None else decay
  grad = g + h.weight_decay * w if (decay and not _is_zero(h.weight_decay)) else g
  b = h.momentum * b + grad                               # b_k = β·b_{k−1} + g_k + ω·W_k
  d = grad + h.momentum * b if h.nesterov else b          # d_k
  if kind is None:                                        # W_{k+1} = W_k − α·κ·d_k
    return (-h.alpha * h.kappa * d).astype(param_dtype), b, None, None
  fixed = _is_number(h.kappa) and _is_number(h.lambdas[kind])   # not changed by inject_hyperparams
  gam_k = lean_state.rebuilt_gamma(z, gam, scale, kind, lam, h.kappa, fixed, h.count)
  if gam is None:                                         # a lean state: W reads Γ_k rebuilt as stored
    gam = lean_state.rounded_gamma(z, scale, made, h.count)
    gam_k = gam if gam_k is None else gam_k               # where Γ is stored, Z would read it
  z = z + h.alpha * ((w - gam_k) / h.mu)                  # Z_{k+1} = Z_k + (α/ν)·(W_k − Γ_k)
  norms = prox.group_norms(z, kind, h.normalize)
  step = after(-h.alpha * h.kappa * (d + (w - gam) / h.mu), norms)   # W_{k+1} − W_k, W written after Z
  return step.astype(param_dtype), b, z, norms            # the step: what optax.apply_updates adds


def structure_update(z, norms, entry, kind, lam, *, hyper: _StepHyper, store_gamma: bool = True):
  """``Γ_{k+1} = κ·prox_λ(Z_{k+1})`` of one leaf; returns ``(Γ_{k+1}, s, entry, made)`` (``s`` ``None`` on lasso).

  ``store_gamma=False``: ``Γ_{k+1}`` is ``None``, and ``made`` on lasso leaves
  the ``(κ, λ)`` that rebuild it (:func:`~dessilbi_jax.core.lean_state.gamma_of`); else ``made`` is ``None``.
  """
  gam, scale = prox.shrink_groups(z, kind, norms, lam, hyper.kappa)
  entry = jnp.where((entry < 0) & (norms > lam), hyper.count, entry)
  made = None
  if not store_gamma:
    gam = None
    if kind == 'lasso':
      made = (_kappa_like(hyper.kappa, lam), lam)
  return gam, (None if kind == 'lasso' else scale), entry, made


def _lambda(lam, dtype):
  """λ in one dtype (at least float32) for every use, so both halves of the step see one ``Γ_k``."""
  return jnp.asarray(lam, jnp.promote_types(dtype, jnp.float32))


def _kappa_like(kappa, lam):
  """κ in λ's dtype (at least float32): the value ``κ·shrink_factor`` multiplies by, to the bit."""
  return jnp.asarray(kappa).astype(jnp.result_type(lam))


def _as_arrays(tree):
  """``tree`` with flax.nnx ``Variable`` leaves replaced by their values (``nnx.as_pure``).

  ``nnx.Optimizer`` gives ``init`` the model's Variables and ``update`` plain
  arrays; both must see the same paths (``'Dense_0/kernel'``).
  """
  return _nnx.as_pure(tree) if _nnx is not None else tree


def _per_group_full(w, kind: str, fill, dtype):
  """A per-group array (keepdims shape) of ``fill``, sharded like ``w`` along the group axis.

  The keepdims sum only gives the shape and sharding; XLA drops it. An
  abstract ``w`` (``jax.ShapeDtypeStruct``, as optax's ``init`` accepts) is
  read as zeros of its shape and sharding.
  """
  if isinstance(w, jax.ShapeDtypeStruct):
    w = jnp.zeros(w.shape, w.dtype, device=w.sharding)
  return jnp.full_like(jnp.sum(w, axis=grouping.reduce_axes(kind, jnp.ndim(w)), keepdims=True), fill, dtype)


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
    weight_decay_mask: Union[None, Any, Callable[[Any], Any]] = None,
    groups: grouping.GroupsRule = None,
    lambdas: Union[None, float, Mapping[str, float]] = None,
    normalize_groups: bool = False,
    state_dtype: Optional[Any] = None,
    ordering_edges: Optional[bool] = None,
    target_density: Union[None, float, targets.Target] = None,
    store_gamma: bool = True,
) -> optax.GradientTransformationExtraArgs:
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
    weight_decay: ω >= 0, L2 decay added to the gradient (of the leaves
      ``weight_decay_mask`` chooses).
    weight_decay_mask: which leaves ω decays, as in ``optax.add_decayed_weights``:
      a pytree of bools shaped like the params (a prefix of them), or a
      callable of the params that returns one. ``None`` (default): leaves of
      rank >= 2 (kernels, not biases or norm scales).
    groups: the grouping rule (:mod:`dessilbi_jax.core.grouping`); ``None`` is the
      reference rule: conv kernels -> ``filter``, 2-D -> ``lasso``, else none.
    lambdas: λ >= 0 of the proximal map: one number for every kind or a
      mapping ``{kind: λ}`` (missing kinds: 1.0). A number works with
      ``optax.inject_hyperparams``.
    normalize_groups: divide ``‖z_g‖`` by ``√(group size)`` in the proximal map.
    state_dtype: dtype of the momentum, ``Z`` and ``Γ``; default: the params'.
      Use ``jnp.float32`` with bf16/f16 params: ``Z`` accumulates steps of size α/ν.
    ordering_edges: order the writes of ``W``, ``Z`` and ``Γ`` with zero-valued
      data edges (:mod:`dessilbi_jax.core.cpu_schedule`), which keeps XLA's CPU
      backend from copying the buffers. ``None`` (default): on when JAX's
      default backend is the CPU (checked when the update is traced), unless
      params are sharded in their types;
      ``True``/``False`` force it. The numbers are the same to the bit either way.
    target_density: steer λ so that Γ's support ends on this density of the
      structured weights: a number ε in (0, 1] is ``Target(density=ε)``, one
      model-wide density of the weights reached by dual ascent on λ (rate
      0.01, every step, λ free to fall to 0); a
      :class:`dessilbi_jax.core.target_density.Target` chooses per layer or per
      group, the budget cap (``method='budget'``: λ only rises, once the
      support holds ε) and the rate (see :mod:`dessilbi_jax.core.target_density`).
      ``None``: λ as given.
    store_gamma: keep ``Γ`` in the state (default). ``False``: a lean state
      without ``Γ``, which is a function of ``Z`` (``Γ_g = s_g·Z_g`` with the
      per-group scale the state keeps; on lasso leaves ``κ·prox_λ(Z)`` with the
      κ and λ that made it, also kept): 4 bytes less state per float32 weight
      (8 instead of 12 on grouped leaves), the same numbers to the bit, and
      :func:`dessilbi_jax.gamma` and the other readers rebuild ``Γ``. On the
      CPU it saves memory between steps (state, checkpoints) but neither time
      nor the update's peak: XLA's CPU backend forms no multi-output fusions,
      so it copies each ``Z_k`` (``W``'s update reads it, ``Z``'s overwrites
      it), all at the start of the update; keep ``Γ`` there. Where XLA fuses
      ``W``'s and ``Z``'s updates into one loop (GPU, TPU) the lean update
      should need no copy and move less memory (not measured here).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores other keyword arguments.

  With ``optax.inject_hyperparams``, every number (``learning_rate``,
  ``kappa``, ``mu``, ``momentum``, ``weight_decay``, a single ``lambdas``)
  becomes part of the state; a callable ``groups`` or a ``state_dtype`` such
  as ``jnp.float32`` is callable too, so name it in ``static_args``:
  ``optax.inject_hyperparams(dl.dessilbi, static_args=('groups', 'state_dtype'))``
  (likewise a callable ``weight_decay_mask``).

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
  _check_number('learning_rate', learning_rate, schedule=True)
  _check_number('kappa', kappa, positive=True)
  _check_number('mu', mu, positive=True)
  _check_number('momentum', momentum, below_one=True)
  _check_number('weight_decay', weight_decay)
  lambda_of = _lambda_per_kind(lambdas)
  if state_dtype is not None:
    if isinstance(state_dtype, (jax.Array, np.ndarray, numbers.Number)):
      raise ValueError(
          f'`state_dtype` must be a dtype such as jnp.float32, got the number {state_dtype!r}. Under '
          'optax.inject_hyperparams a dtype is callable and taken for a schedule: name it in static_args, '
          "optax.inject_hyperparams(dl.dessilbi, static_args=('state_dtype',)).")
    if not jnp.issubdtype(state_dtype, jnp.floating):
      raise ValueError(f'`state_dtype` must be a floating-point dtype, got {state_dtype!r}.')
  _check_flag('nesterov', nesterov)
  _check_flag('normalize_groups', normalize_groups)
  _check_flag('store_gamma', store_gamma, ': False keeps a lean state without Γ (rebuilt from Z by dl.gamma)')
  if ordering_edges is not None:
    _check_flag('ordering_edges', ordering_edges, ' or None (on when the default backend is the CPU)')
  store_gamma = bool(store_gamma)
  target = targets.as_target(target_density)

  def init_fn(params):
    params = _as_arrays(params)
    _check_float_params(params)
    kinds = grouping.resolve_kinds(params, groups)
    dtype_of = lambda w: state_dtype or jnp.result_type(w)
    per_leaf = lambda f: jax.tree.map(lambda w, k: None if k is None else f(w, k), params, kinds)
    # A lean state's lasso leaves: the κ and λ of Γ_0 = κ·prox_λ(0) = 0, in λ's dtype.
    lam_0 = lambda w, k: _lambda(lambda_of[k] if target is None else targets.effective_lambda(
        lambda_of[k], jnp.zeros([], jnp.float32), target.method), dtype_of(w))
    lasso = lambda f: None if store_gamma else per_leaf(lambda w, k: f(w, k) if k == 'lasso' else None)
    return DessiLBIState(
        count=jnp.zeros([], jnp.int32),
        trace=jax.tree.map(lambda w: jnp.zeros_like(w, dtype_of(w)), params),
        z=per_leaf(lambda w, k: jnp.zeros_like(w, dtype_of(w))),
        gamma=per_leaf(lambda w, k: jnp.zeros_like(w, dtype_of(w)) if store_gamma else None),
        gamma_scale=per_leaf(lambda w, k: None if k == 'lasso' else _per_group_full(w, k, 0, dtype_of(w))),
        entry_step=per_leaf(lambda w, k: _per_group_full(w, k, -1, jnp.int32)),
        threshold=None if target is None else per_leaf(lambda w, k: jnp.zeros([], jnp.float32)),
        gamma_kappa=lasso(lambda w, k: _kappa_like(kappa, lam_0(w, k))),
        gamma_lambda=lasso(lam_0),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args   # optax's convention: unknown keyword arguments are ignored
    if params is None:
      raise ValueError('dessilbi needs `params` in update(grads, state, params): W enters the coupling (W − Γ)/ν.')
    updates, params = _as_arrays(updates), _as_arrays(params)
    kinds = grouping.resolve_kinds(params, groups)
    hyper = _StepHyper(
        alpha=learning_rate(state.count) if callable(learning_rate) else learning_rate,
        kappa=kappa, mu=mu, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        lambdas=lambda_of, normalize=normalize_groups, count=optax.safe_increment(state.count))
    treedef = jax.tree.structure(params)
    kinds = treedef.flatten_up_to(kinds)
    decays = _decay_leaves(params, treedef)
    leaves = list(zip(*[treedef.flatten_up_to(t) for t in (
        updates, state.trace, params, state.z, state.gamma, state.gamma_scale, state.entry_step)]))
    made = _made_leaves(state, treedef)
    ordered = cpu_schedule.wanted(ordering_edges, jax.tree.leaves(params))
    if target is not None:
      return _targeted_update(leaves, kinds, made, decays, treedef, state, hyper, ordered)
    step = functools.partial(leaf_update, hyper=hyper, store_gamma=store_gamma)
    leaves = [args + (kind, m, d) for args, kind, m, d in zip(leaves, kinds, made, decays)]
    if ordered:
      results = cpu_schedule.update_in_order(step, leaves, kinds)
    else:
      results = [step(*args) for args in leaves]
    fields = list(zip(*results)) or [()] * 7   # no params: empty trees
    step, b, z, gam, scale, entry = (treedef.unflatten(list(f)) for f in fields[:6])
    return step, DessiLBIState(count=hyper.count, trace=b, z=z, gamma=gam, gamma_scale=scale, entry_step=entry,
                               **_made_fields(fields[6], treedef))

  def _decay_leaves(params, treedef):
    """Per leaf, whether ω decays it (``None``: the rank rule)."""
    if weight_decay_mask is None:
      return [None] * treedef.num_leaves
    mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
    try:
      flags = treedef.flatten_up_to(jax.tree.map(
          lambda m, p: jax.tree.map(lambda _: m, p), mask, params, is_leaf=lambda x: isinstance(x, (bool, np.bool_))))
    except (ValueError, TypeError) as e:
      raise ValueError(f'`weight_decay_mask` must be a pytree of bools shaped like the params (or a prefix), '
                       f'or a callable of the params returning one: {e}') from e
    for flag in flags:
      if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f'`weight_decay_mask` must hold True or False per leaf, got {flag!r}.')
    return [bool(f) for f in flags]

  def _made_leaves(state, treedef):
    """Per leaf, ``(κ, λ)`` of a lean state's lasso ``Γ_k``, else ``None``."""
    if store_gamma:
      return [None] * treedef.num_leaves
    return [None if k is None else (k, lam) for k, lam in zip(
        treedef.flatten_up_to(state.gamma_kappa), treedef.flatten_up_to(state.gamma_lambda))]

  def _made_fields(made, treedef):
    if store_gamma:
      return {}
    made = list(made)
    return dict(gamma_kappa=treedef.unflatten([None if m is None else m[0] for m in made]),
                gamma_lambda=treedef.unflatten([None if m is None else m[1] for m in made]))

  def _targeted_update(leaves, kinds, made, decays, treedef, state, hyper, ordered):
    """The step with λ steered to the target: W and Z of every leaf, then λ from all norms, then Γ."""
    thresholds = treedef.flatten_up_to(state.threshold)
    dtypes = [jnp.result_type(b) for _, b, *_ in leaves]
    lam_of = lambda kind, t, dtype: _lambda(targets.effective_lambda(lambda_of[kind], t, target.method), dtype)
    coupled_leaves = [(g, b, w, z, gam, scale, kind, None if kind is None else lam_of(kind, t, b.dtype), m, d)
                      for (g, b, w, z, gam, scale, _), kind, t, m, d in zip(leaves, kinds, thresholds, made, decays)]
    coupled = functools.partial(coupled_update, hyper=hyper)
    if ordered:
      results = cpu_schedule.update_in_order(coupled, coupled_leaves, kinds, chain_on=2)
    else:
      results = [coupled(*args) for args in coupled_leaves]
    structured = [i for i, k in enumerate(kinds) if k is not None]
    fresh = targets.next_thresholds(
        target, [results[i][3] for i in structured],
        [grouping.group_size(kinds[i], jnp.shape(leaves[i][2])) for i in structured],
        [lambda_of[kinds[i]] for i in structured], [thresholds[i] for i in structured], hyper.count)
    new_thresholds = [None] * len(kinds)
    for i, t in zip(structured, fresh):
      new_thresholds[i] = t
    after = cpu_schedule.after if ordered else _unordered
    out = []
    for (step, b, z, norms), (_, _, w, _, _, _, entry), kind, t, dtype in zip(
        results, leaves, kinds, new_thresholds, dtypes):
      if kind is None:
        out.append((step, b, None, None, None, None, None))
        continue
      lam = after(lam_of(kind, t, dtype), w + step)         # Γ written after W
      out.append((step, b, z, *structure_update(z, norms, entry, kind, lam, hyper=hyper, store_gamma=store_gamma)))
    fields = list(zip(*out)) or [()] * 7
    step, b, z, gam, scale, entry = (treedef.unflatten(list(f)) for f in fields[:6])
    return step, DessiLBIState(count=hyper.count, trace=b, z=z, gamma=gam, gamma_scale=scale, entry_step=entry,
                               threshold=treedef.unflatten(new_thresholds), **_made_fields(fields[6], treedef))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


gamma_of = lean_state.gamma_of   # Γ of one state, stored or rebuilt (dl.gamma finds the state)
